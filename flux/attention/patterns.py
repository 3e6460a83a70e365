"""Sparse-attention patterns: which keys a query may see when its layer is routed to SA.

A pattern is a rule on real-token positions (padding excluded), so the same rule serves prefill without a cache,
decode over a full cache, and decode over a trimmed cache. Backends (reference torch, FlexAttention, Triton) all
implement the rule given here; the reference is the definition.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from flux.errors import FluxUserError


class PatternError(FluxUserError):
    """A sparse pattern was asked for with an unknown name or invalid parameters."""


@dataclass(frozen=True)
class SparsePattern:
    """Base class. `visible(q_pos, k_pos)` says which causal keys survive; subclasses define it."""

    name: ClassVar[str] = "base"

    def visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def cache_budget(self) -> tuple[int, int] | None:
        """(sink, window) slots an SA layer needs after prefill, or None when the pattern cannot trim its cache."""
        return None

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

    def cache_budget(self) -> tuple[int, int]:
        return self.sink, self.window


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
