"""Speed and memory of each training step, logged next to the losses: what a long-context run needs to know first
(does it fit, how many tokens per second) without a profiler.

Per step: `perf/step_s` (wall seconds of the training step: forwards, backward, optimizer; data loading excluded),
`perf/tokens` (real tokens of the batch), `perf/tokens_per_s`, and on CUDA `perf/peak_gib` (the most memory torch
allocated during the step, weights included), split at the backward into `perf/forward_peak_gib` (the peak of the
forwards) and `perf/held_for_backward_gib` (what is allocated when the backward starts: the weights plus everything
the graph saved for it, the number activation checkpointing is meant to shrink). CUDA work is synchronised at both
ends, so the time is the GPU's.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

GIB = 2 ** 30


class ThroughputCallback(L.Callback):
    """Logs step time, tokens per second and peak GPU memory of every training step (see the module docstring)."""

    def __init__(self) -> None:
        self._start: float | None = None
        self._forward: dict[str, float] = {}

    @staticmethod
    def _sync(module: L.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._sync(pl_module)
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._start = time.perf_counter()

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if self._start is not None and pl_module.device.type == "cuda":
            self._forward = {"perf/forward_peak_gib": torch.cuda.max_memory_allocated(pl_module.device) / GIB,
                             "perf/held_for_backward_gib": torch.cuda.memory_allocated(pl_module.device) / GIB}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._start is None:
            return
        self._sync(pl_module)
        seconds = time.perf_counter() - self._start
        self._start = None
        tokens = int(batch["attention_mask"].sum())
        size = batch["input_ids"].shape[0]
        stats = {"perf/step_s": seconds, "perf/tokens": float(tokens), "perf/tokens_per_s": tokens / seconds}
        if pl_module.device.type == "cuda":
            stats["perf/peak_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / GIB
            stats.update(self._forward)
        self._forward = {}
        pl_module.log_dict(stats, on_step=True, on_epoch=False, batch_size=size)
