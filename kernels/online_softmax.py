"""The online-softmax accumulation step shared by flux's attention kernels (flash-attention style).

Scores arrive in log2 units (the caller folds log2(e) into the scale) with invisible entries at -inf; the running
max starts at -1e30 rather than -inf so a tile with no visible key adds exactly nothing instead of NaN.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def online_softmax_step(acc, l_i, m_i, qk, v, PRECISION: tl.constexpr):
    """Fold one [M, N] score tile and its [N, D] values into (acc [M, D], l_i [M], m_i [M])."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.exp2(qk - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, l_i, m_new
