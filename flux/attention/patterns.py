"""Sparse-attention patterns: which keys a query may see when its layer is routed to SA.

A pattern is a rule on real-token positions (padding excluded), so the same rule serves prefill without a cache,
decode over a full cache, and decode over a trimmed cache. Backends (reference torch, FlexAttention, Triton) all
implement the rule given here; the reference is the definition.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch


class PatternError(ValueError):
    """A sparse pattern was asked for with an unknown name or invalid parameters."""


@dataclass(frozen=True)
class SparsePattern:
    """Base class. `visible(q_pos, k_pos)` says which causal keys survive; subclasses define it."""

    name: ClassVar[str] = "base"

    def visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def kv_policy(self) -> tuple[int, int] | None:
        """(sink, window) when a layer routed to this pattern needs only its first `sink` and last `window` keys for
        decode (the engine keeps them in a sink + ring cache, every kept key visible); None keeps the full KV."""
        return None

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_pad: torch.Tensor | None,
                scale: float, backend: str = "auto") -> torch.Tensor:
        """Inference attention of queries q [B, H, Tq, D] (the last Tq of the Tk keys) over k/v [B, Hkv, Tk, D]."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"pattern": self.name, **asdict(self)}


@dataclass(frozen=True)
class StreamingPattern(SparsePattern):
    """Attention sinks + a local window (StreamingLLM-style; the paper's default is sink 128, window 2048).

    Query at real position p sees key at real position j <= p iff j < sink or p - j < window. The window counts the
    query's own token, so a decode step over `window` ring-buffer slots sees exactly what prefill would have seen.
    """

    name: ClassVar[str] = "streaming"
    sink: int = 128
    window: int = 2048

    def __post_init__(self) -> None:
        if not isinstance(self.sink, int) or self.sink < 0:
            raise PatternError(f"streaming sink must be an integer >= 0, got {self.sink!r}; use e.g. sink=128")
        if not isinstance(self.window, int) or self.window <= 0:
            raise PatternError(f"streaming window must be an integer > 0, got {self.window!r}; use e.g. window=2048")

    def visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        return (k_pos < self.sink) | (q_pos - k_pos < self.window)

    def kv_policy(self) -> tuple[int, int]:
        return self.sink, self.window

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_pad: torch.Tensor | None,
                scale: float, backend: str = "auto") -> torch.Tensor:
        """The Triton kernel (visits only sink and window key blocks); backend 'torch' is the masked SDPA path."""
        if backend == "torch" or (backend == "auto" and not q.is_cuda):
            from flux.attention.backends import sdpa_attention
            from flux.attention.masks import position_mask

            b, tq, tk = q.shape[0], q.shape[2], k.shape[2]
            pad = torch.zeros(b, dtype=torch.long, device=q.device) if kv_pad is None else kv_pad.long()
            k_pos = torch.arange(tk, device=q.device)[None, :] - pad[:, None]
            mask = position_mask(k_pos[:, tk - tq:], k_pos, k_pos >= 0, self)
            return sdpa_attention(q, k, v, mask, scale)
        from flux_kernels.streaming_prefill import streaming_attention_prefill

        return streaming_attention_prefill(q, k, v, self.sink, self.window, kv_pad, scale=scale)


PATTERNS: dict[str, type[SparsePattern]] = {StreamingPattern.name: StreamingPattern}


def get_pattern(name: str, **params: Any) -> SparsePattern:
    """Build a registered pattern by name; unknown names and parameters fail with the list of valid ones."""
    if name not in PATTERNS:
        raise PatternError(f"unknown sparse pattern {name!r}; registered patterns: {', '.join(sorted(PATTERNS))}")
    cls = PATTERNS[name]
    allowed = set(cls.__dataclass_fields__)
    unknown = set(params) - allowed
    if unknown:
        raise PatternError(f"sparse pattern {name!r} got unknown parameter(s) {sorted(unknown)}; "
                           f"it takes {sorted(allowed)}")
    return cls(**params)
