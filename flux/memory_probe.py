"""What a training step holds for its backward, measured on any device (the CPU included), where no allocator trace
is at hand: the bytes checked against flux.memory's estimate.

* `SavedForBackward` is a `saved_tensors_hooks` pair that records every tensor autograd saves for the backward, once
  per storage (views and repeated saves of one buffer count once), with its shape, dtype and the flux /
  transformers source line that saved it. Inside an activation-checkpointed region the checkpoint's own hooks take
  precedence, so what it sees is exactly what survives the forward outside checkpoints.
* `LiveTensors` is a `TorchDispatchMode` that follows every storage an operator creates until it is freed: the
  bytes alive at any moment (`snapshot`), grouped by the source line that made them, and the peak. Created storages
  only: parameters, buffers and inputs made before the mode count as the caller's.

Both attribute bytes to the innermost frames of flux and of transformers' model files, so a finding names the line
of code that holds the memory.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# frames worth naming: flux's code and the transformers model definitions (not torch's or Lightning's plumbing)
SOURCE_MARKERS = ("/flux/", "/transformers/models/", "/transformers/modeling_", "/transformers/integrations/")


def source_of(depth: int = 3) -> str:
    """The innermost `depth` frames of flux / transformers model code on the current stack, innermost first."""
    frame = sys._getframe(1)
    found: list[str] = []
    while frame is not None and len(found) < depth:
        name = frame.f_code.co_filename
        if any(marker in name for marker in SOURCE_MARKERS) and not name.endswith("memory_probe.py"):
            short = name.split("/flux/")[-1] if "/flux/" in name else name.split("/transformers/")[-1]
            found.append(f"{short}:{frame.f_lineno} {frame.f_code.co_name}")
        frame = frame.f_back
    return " < ".join(found) or "(outside flux and transformers)"


@dataclass
class Saved:
    """One storage autograd saved: its bytes, the shape and dtype of the first tensor saved from it, and where."""

    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    source: str


@dataclass
class SavedForBackward:
    """saved_tensors_hooks recording each storage saved for the backward once (see the module docstring).
    `ignore`: tensors whose storages never count (the frozen weights, the router's parameters)."""

    ignore: Iterable[torch.Tensor] = ()
    saved: dict[int, Saved] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._ignored = {t.untyped_storage().data_ptr() for t in self.ignore}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda packed: packed)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if storage.nbytes() and key not in self._ignored and key not in self.saved:
            self.saved[key] = Saved(storage.nbytes(), tuple(tensor.shape), tensor.dtype, source_of())
        return tensor

    def __enter__(self) -> SavedForBackward:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(s.nbytes for s in self.saved.values())

    def by_source(self) -> list[tuple[str, int, int]]:
        """(source, bytes, storages), largest first."""
        return _grouped((s.source, s.nbytes) for s in self.saved.values())


class LiveTensors(TorchDispatchMode):
    """Bytes of the storages created under this mode that are still alive, and the peak (see the module docstring).
    `existing`: tensors made before the mode (weights, inputs) whose storages new views share."""

    def __init__(self, existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self._foreign = {t.untyped_storage().data_ptr() for t in existing}
        self._live: dict[int, tuple[StorageWeakRef, int, str, tuple[int, ...], torch.dtype]] = {}
        self.current = 0
        self.peak = 0
        self.peak_sources: list[tuple[str, int, int]] = []
        self.peak_tensors: list[tuple[int, tuple[int, ...], torch.dtype, str]] = []  # (bytes, shape, dtype, source)

    def _collect(self) -> None:
        dead = [key for key, (ref, *_rest) in self._live.items() if ref.expired()]
        for key in dead:
            self.current -= self._live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._collect()
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage().data_ptr()
                if key not in self._live:
                    self._foreign.add(key)
        source = None
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if not storage.nbytes() or key in self._live or key in self._foreign:
                continue
            source = source or source_of()
            self._live[key] = (StorageWeakRef(storage), storage.nbytes(), source, tuple(t.shape), t.dtype)
            self.current += storage.nbytes()
        if self.current > self.peak:
            self.peak = self.current
            self.peak_sources = self.snapshot()
            self.peak_tensors = sorted(((nbytes, shape, dtype, source) for _r, nbytes, source, shape, dtype
                                        in self._live.values()), key=lambda item: -item[0])
        return out

    def snapshot(self) -> list[tuple[str, int, int]]:
        """(source, bytes, storages) alive now, largest first."""
        self._collect()
        return _grouped((source, nbytes) for _ref, nbytes, source, _shape, _dtype in self._live.values())

    def alive(self) -> int:
        self._collect()
        return self.current


def _grouped(items: Iterable[tuple[str, int]]) -> list[tuple[str, int, int]]:
    sizes: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for source, nbytes in items:
        sizes[source] += nbytes
        counts[source] += 1
    return [(source, sizes[source], counts[source]) for source, _ in sizes.most_common()]
