"""`xattn`: XAttention block-sparse prefill (arXiv 2503.16428), blocks chosen per head by antidiagonal scoring.

Per (sample, head) the prompt's causal attention matrix is cut into block_size x block_size blocks (in padded
coordinates: block i holds indices [i * block_size, (i + 1) * block_size)). Each block is scored by antidiagonal
sums over stride x stride tiles, softmax-normalised per strided query row (as the official code does), and each
query block keeps the smallest set of key blocks whose score mass reaches `threshold` of its row, always including
the sink block (the sample's first real block) and the diagonal block. Attention then runs over the kept blocks
only (causal inside the diagonal block; padding keys never attended).

Defaults are the paper's: block 128 (the official kernels assume it), stride 8 (its LongBench setting; RULER also
uses 16), threshold 0.9. Decode keeps the full KV and attends it all: the selection is a prefill-time estimate of
what each query block needs, not a cache policy, and a block-selecting decode has not been shown to keep quality.

Scoring and block selection run without gradient in every path; the attention over the selected blocks is
differentiable in the training path.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import ClassVar

import torch

from flux.attention.patterns.base import (
    PatternError,
    RowRule,
    SparsePattern,
    check_int,
    padding_layout,
    resolve_prefill_backend,
)


@dataclass(frozen=True)
class XAttentionPattern(SparsePattern):
    """Block-sparse prefill by antidiagonal scoring and a cumulative-mass threshold."""

    name: ClassVar[str] = "xattn"
    block_size: int = 128
    stride: int = 8
    threshold: float = 0.9
    density: float | None = None  # benchmarks only: keep this fraction of the causal blocks, ignoring threshold

    def __post_init__(self) -> None:
        check_int(self.name, "block_size", self.block_size, 16, "block_size=128")
        if self.block_size & (self.block_size - 1):
            raise PatternError(f"xattn block_size must be a power of two >= 16, got {self.block_size}; "
                               "use e.g. block_size=128")
        check_int(self.name, "stride", self.stride, 1, "stride=8")
        if self.block_size % self.stride:
            raise PatternError(f"xattn stride must divide block_size={self.block_size}, got {self.stride}; "
                               "use a power of two such as stride=8 or 16")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not 0.0 < self.threshold <= 1.0:
            raise PatternError(f"xattn threshold must lie in (0, 1], got {self.threshold!r}; use e.g. threshold=0.9 "
                               "(1.0 keeps every causal block)")
        if self.density is not None and (isinstance(self.density, bool) or not isinstance(self.density, (int, float))
                                         or not 0.0 < self.density <= 1.0):
            raise PatternError(f"xattn density must be null or lie in (0, 1], got {self.density!r}; leave it null "
                               "(threshold selection) outside benchmarks")

    # --------------------------------------------------------------------------------------------- selection
    def select(self, q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None, scale: float,
               backend: str = "torch") -> torch.Tensor:
        """Kept blocks [B, H, NB, NB] bool of a prompt; ``valid`` [B, T] marks real tokens (None = all real).
        With ``density`` set, a fixed fraction of the causal blocks replaces the threshold (benchmarks only:
        random weights give near-uniform scores). backend 'triton' scores with the Triton kernel (left padding)."""
        from flux_kernels.block_select import select_blocks

        seq_len = q.shape[2]
        with torch.no_grad():
            if backend == "triton":
                from flux_kernels.xattn_scores import xattn_block_scores

                pad = None if valid is None else (~valid).sum(dim=1)
                scores = xattn_block_scores(q, k, self.block_size, self.stride, pad, scale)
            else:
                from flux_kernels.xattn_scores import xattn_block_scores_torch

                scores = xattn_block_scores_torch(q, k, valid, self.block_size, self.stride, scale)
            return select_blocks(scores, valid, self.block_size, seq_len, **self._budget())

    def _budget(self) -> dict[str, float | None]:
        if self.density is not None:
            return {"threshold": None, "density": float(self.density)}
        return {"threshold": float(self.threshold), "density": None}

    def selected_density(self, q: torch.Tensor, k: torch.Tensor, kv_pad: torch.Tensor | None, scale: float,
                         backend: str = "auto") -> float:
        """Fraction of the causal (query block, key block) pairs the threshold keeps, over samples, heads and real
        query blocks: the measure to report for real activations."""
        from flux_kernels.block_select import block_density

        backend = resolve_prefill_backend(self, backend, q.device)
        valid, _ = padding_layout(kv_pad, q.shape[0], q.shape[2], q.device)
        keep = self.select(q, k, valid, scale, backend)
        return block_density(keep, valid, self.block_size, q.shape[2])

    def _token_rule(self, keep: torch.Tensor, seq_len: int) -> RowRule:
        blocks = torch.arange(seq_len, device=keep.device) // self.block_size

        def rule(lo: int, hi: int) -> torch.Tensor:
            return keep[:, :, blocks[lo:hi]][:, :, :, blocks]

        return rule

    # --------------------------------------------------------------------------------------------- contract
    def prompt_rule(self, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                    k_valid: torch.Tensor | None, scale: float) -> RowRule:
        return self._token_rule(self.select(q, k, k_valid, scale), q.shape[2])

    def triton_prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_pad: torch.Tensor | None,
                       scale: float) -> torch.Tensor:
        from flux_kernels.block_select import block_lists
        from flux_kernels.block_sparse_prefill import block_sparse_attention

        valid, _ = padding_layout(kv_pad, q.shape[0], q.shape[2], q.device)
        keep = self.select(q, k, valid, scale, "triton")
        kv_blocks, counts = block_lists(keep)
        return block_sparse_attention(q, k, v, kv_blocks, counts, self.block_size, kv_pad, scale)

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_pad: torch.Tensor | None,
                  scale: float) -> torch.Tensor:
        from flux_kernels.reference import (
            block_sparse_attention_reference,
            xattn_block_scores_reference,
            xattn_select_reference,
        )

        seq_len = q.shape[2]
        with torch.no_grad():
            scores = xattn_block_scores_reference(q.detach(), k.detach(), kv_pad, self.block_size, self.stride,
                                                  scale)
            keep = xattn_select_reference(scores, kv_pad, self.block_size, seq_len, **self._budget())
        return block_sparse_attention_reference(q, k, v, keep, self.block_size, kv_pad, scale)

    def flex_mask_mod(self, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor | None,
                      k_pos: torch.Tensor | None, k_valid: torch.Tensor | None,
                      scale: float) -> tuple[Callable, Hashable | None]:
        if q.shape[2] != k.shape[2]:  # decode steps attend every causal key (full KV)
            offset = k.shape[2] - q.shape[2]
            valid = k_valid if k_valid is not None else torch.ones(k.shape[0], k.shape[2], dtype=torch.bool,
                                                                   device=k.device)

            def causal_mod(b, h, qi, ki):
                return valid[b, ki] & (ki <= qi + offset)

            return causal_mod, None
        keep = self.select(q, k, k_valid, scale)
        valid = k_valid if k_valid is not None else torch.ones(k.shape[0], k.shape[2], dtype=torch.bool,
                                                               device=k.device)
        size = self.block_size

        def mask_mod(b, h, qi, ki):
            return valid[b, ki] & (ki <= qi) & keep[b, h, qi // size, ki // size]

        return mask_mod, None

