"""`triangle`: TriangleMix-style sparse attention (arXiv 2507.21526) — streaming plus a dense band of last queries.

Every query sees its sinks and its local window; the last `last_q` queries of the prompt (the last `last_q` real
positions of each sample) attend every causal key, so the tokens that start generation still read the whole
context. Decode keeps sink + window, like streaming: its queries are not prompt queries. Triton prefill is two
passes: the streaming kernel over every row, then the band's rows again with split-K causal attention
(`flux_kernels.split_k_prefill`: the band's keys cut into chunks over the whole GPU, partial softmaxes merged), which
overwrites them. One launch with the band's rows as extra rows of the streaming kernel measured 24% (128k) and 36%
(32k) slower than streaming for attention alone on an H200: those few rows' programs ran on alone after the rest.

Defaults: sink 128 and window 2048 as flux's streaming default; last_q 64. The TriangleMix paper's exact values
could not be read from here (MInference's tri-shape kernel, its predecessor, uses a last band of 100 queries).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from flux.attention.patterns.base import PositionalPattern, check_int, check_sink_window, within_policy


@dataclass(frozen=True)
class TrianglePattern(PositionalPattern):
    """Sinks + local window, and the prompt's last `last_q` queries dense."""

    name: ClassVar[str] = "triangle"
    sink: int = 128
    window: int = 2048
    last_q: int = 64

    def __post_init__(self) -> None:
        check_sink_window(self.name, self.sink, self.window)
        check_int(self.name, "last_q", self.last_q, 0, "last_q=64 (0 = streaming)")

    def visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor,
                prompt_len: torch.Tensor | int | None = None) -> torch.Tensor:
        if prompt_len is None:
            raise ValueError("the triangle rule needs prompt_len: its last last_q queries are dense")
        return within_policy(q_pos, k_pos, (self.sink, self.window)) | (q_pos >= prompt_len - self.last_q)

    def kv_policy(self) -> tuple[int, int]:
        return self.sink, self.window

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_pad: torch.Tensor | None,
                  scale: float) -> torch.Tensor:
        from flux_kernels.reference import streaming_attention_reference

        return streaming_attention_reference(q, k, v, kv_pad, self.sink, self.window, scale, dense_last=self.last_q)

    def triton_prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_pad: torch.Tensor | None,
                       scale: float) -> torch.Tensor:
        from flux_kernels.streaming_prefill import streaming_attention_prefill

        return streaming_attention_prefill(q, k, v, self.sink, self.window, kv_pad=kv_pad, scale=scale,
                                           dense_last=self.last_q)
