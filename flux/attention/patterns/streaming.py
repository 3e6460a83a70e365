"""`streaming`: attention sinks + a local window (StreamingLLM-style; the FluxAttention paper's SA default is
sink 128, window 2048).

A query at real position p sees key j <= p iff j < sink or p - j < window. The window counts the query's own token,
so a decode step over `window` ring-buffer slots sees exactly what prefill would have seen; decode keeps sink +
window. Prefill is flux's streaming Triton kernel, O(T * (sink + window)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from flux.attention.patterns.base import PositionalPattern, check_sink_window, within_policy


@dataclass(frozen=True)
class StreamingPattern(PositionalPattern):
    """Sinks + local window."""

    name: ClassVar[str] = "streaming"
    sink: int = 128
    window: int = 2048

    def __post_init__(self) -> None:
        check_sink_window(self.name, self.sink, self.window)

    def visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor,
                prompt_len: torch.Tensor | int | None = None) -> torch.Tensor:
        return within_policy(q_pos, k_pos, (self.sink, self.window))

    def kv_policy(self) -> tuple[int, int]:
        return self.sink, self.window

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_pad: torch.Tensor | None,
                  scale: float) -> torch.Tensor:
        from flux_kernels.reference import streaming_attention_reference

        return streaming_attention_reference(q, k, v, kv_pad, self.sink, self.window, scale)

    def triton_prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_pad: torch.Tensor | None,
                       scale: float) -> torch.Tensor:
        from flux_kernels.streaming_prefill import streaming_attention_prefill

        return streaming_attention_prefill(q, k, v, self.sink, self.window, kv_pad=kv_pad, scale=scale)
