"""The 'triton' SA backend: flux's streaming-attention Triton kernels behind the dispatcher's call signature.

Prefill (Tq > 1) runs ``streaming_attention_prefill``, which visits only sink and window key blocks. It reads the
padding from ``k_valid`` and relies on the layout FluxModel produces: keys left-padded, real positions 0, 1, ... in
order, queries the last Tq keys. Decode (Tq == 1) runs the split-KV ``decode_attention`` on per-slot positions, so
it serves any slot order.
"""

from __future__ import annotations

import torch
from flux_kernels.decode import decode_attention
from flux_kernels.streaming_prefill import streaming_attention_prefill

from flux.attention.patterns import SparsePattern, StreamingPattern


def triton_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                            k_pos: torch.Tensor, k_valid: torch.Tensor | None, pattern: SparsePattern,
                            scaling: float) -> torch.Tensor:
    """q [B, H, Tq, D], k/v [B, Hkv, Tk, D], q_pos [B, Tq], k_pos [B, Tk], k_valid [B, Tk] or None -> [B, H, Tq, D]."""
    if pattern.name != StreamingPattern.name:
        raise ValueError(f"the triton SA backend implements the 'streaming' pattern only, got {pattern.name!r}; "
                         "use sa_backend='flex' or 'masked_sdpa' for other patterns")
    if q.shape[2] == 1:
        kv_pos = k_pos if k_valid is None else k_pos.masked_fill(~k_valid, -1)
        return decode_attention(q, k, v, sink=pattern.sink, window=pattern.window, scale=scaling,
                                kv_pos=kv_pos, q_pos=q_pos[:, -1])
    pad = None if k_valid is None else (~k_valid).sum(dim=1)
    return streaming_attention_prefill(q, k, v, pattern.sink, pattern.window, kv_pad=pad, scale=scaling)
