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

from flux.attention.patterns.base import (
    PositionalPattern,
    check_sink_window,
    resolve_prefill_backend,
    within_policy,
)


@dataclass(frozen=True)
class StreamingPattern(PositionalPattern):
    """Sinks + local window."""

    name: ClassVar[str] = "streaming"
    chunkable_queries: ClassVar[bool] = True
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

    def prefill_rows(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     backend: str = "auto") -> torch.Tensor:
        """The streaming kernel takes queries aligned to the last keys as they are; the torch path masks them."""
        if resolve_prefill_backend(self, backend, q.device) == "triton":
            return self.triton_prefill(q, k, v, None, scale)
        tq, tk = q.shape[2], k.shape[2]
        k_pos = torch.arange(tk, device=q.device)
        q_pos = k_pos[tk - tq:, None]
        allowed = (k_pos[None, :] <= q_pos) & self.visible(q_pos, k_pos[None, :])
        group = q.shape[1] // k.shape[1]
        return torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=allowed, scale=scale)
