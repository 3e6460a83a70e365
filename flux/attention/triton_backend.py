"""The 'triton' SA backend: each pattern's Triton kernels behind the dispatcher's call signature (no gradient).

A whole prompt (Tq == Tk) runs the pattern's own prefill kernel. Queries that are not a whole prompt follow the
pattern's KV policy, as in the engine: decode (Tq == 1) runs the split-KV ``decode_attention`` on per-slot
positions, so it serves any slot order; 1 < Tq < Tk runs the streaming
kernel with queries aligned to the last keys. Both read the padding from ``k_valid`` and rely on the layout
FluxModel produces: keys left-padded, real positions 0, 1, ... in order.
"""

from __future__ import annotations

import torch
from flux_kernels.decode import decode_attention
from flux_kernels.streaming_prefill import streaming_attention_prefill

from flux.attention.patterns.base import SparsePattern, left_padding


def triton_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                            k_pos: torch.Tensor, k_valid: torch.Tensor | None, pattern: SparsePattern,
                            scaling: float) -> torch.Tensor:
    """q [B, H, Tq, D], k/v [B, Hkv, Tk, D], q_pos [B, Tq], k_pos [B, Tk], k_valid [B, Tk] or None -> [B, H, Tq, D]."""
    if q.shape[2] == k.shape[2]:
        return pattern.prefill(q, k, v, left_padding(k_valid, "SA backend 'triton'"), scaling, backend="triton")
    sink, window = pattern.kv_policy() or (0, None)
    if q.shape[2] == 1:
        kv_pos = k_pos if k_valid is None else k_pos.masked_fill(~k_valid, -1)
        return decode_attention(q, k, v, sink=sink, window=window, scale=scaling, kv_pos=kv_pos, q_pos=q_pos[:, -1])
    pad = left_padding(k_valid, "SA backend 'triton'")
    return streaming_attention_prefill(q, k, v, sink, window, kv_pad=pad, scale=scaling)
