"""The online-softmax accumulation shared by flux's attention kernels (flash-attention style): one tile step, and
a causal walk over a key range built on it.

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


@triton.jit
def attend_causal_range(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, lo, hi, rows, pad, qk_scale,
                        offs_d, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Online-softmax update with keys [lo, hi) of one (batch, kv head) under causal attention of a left-padded
    sample: masked calls hide keys past each row's absolute position ``rows`` [M], keys before ``pad`` and keys
    from ``hi`` on; unmasked calls need whole blocks that every row sees."""
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        keys = start + offs_n
        if MASKED:
            in_range = keys < hi
            k = tl.load(k_base + keys[:, None].to(tl.int64) * stride_kt + offs_d[None, :], mask=in_range[:, None],
                        other=0.0)
            v = tl.load(v_base + keys[:, None].to(tl.int64) * stride_vt + offs_d[None, :], mask=in_range[:, None],
                        other=0.0)
        else:
            k = tl.load(k_base + keys[:, None].to(tl.int64) * stride_kt + offs_d[None, :])
            v = tl.load(v_base + keys[:, None].to(tl.int64) * stride_vt + offs_d[None, :])
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:
            visible = in_range[None, :] & (keys[None, :] >= pad) & (keys[None, :] <= rows[:, None])
            qk = tl.where(visible, qk, float("-inf"))
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, qk, v, PRECISION)
    return acc, l_i, m_i
