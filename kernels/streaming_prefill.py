"""Triton forward kernel for streaming (attention sinks + local window) prefill attention.

Why a kernel: a dense causal kernel with a mask still pays O(T^2); here each query block only visits the key blocks
that hold its sinks and its window, so the cost is O(T * (sink + window)). Exactly the semantics of
``flux_kernels.reference.streaming_attention_reference``: causal, left padding per sample (``kv_pad``), GQA, queries
are the last Tq of the Tk keys, rows without any visible key (padding rows) return zeros. ``dense_last`` (the
triangle pattern: the last rows attend every causal key) is a second pass over those rows by
``flux_kernels.split_k_prefill``, which spreads their long key range over the whole GPU.

Each program owns BLOCK_M query rows of one (batch, head). Its keys come in three ranges, visited in order:
  1. sinks      [pad, sink_hi)            masked (causality, end of range)
  2. window     [win_lo, row_hi)          split into a masked head, an unmasked body of whole blocks that every
                                          row of the block sees, and a masked tail around the diagonal.
sink_hi is clipped to win_lo so no key is counted twice.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from flux_kernels._checks import check_pattern, check_per_sample, check_qkv
from flux_kernels.online_softmax import online_softmax_step
from flux_kernels.split_k_prefill import split_k_attention

LOG2E = 1.4426950408889634


@triton.jit
def _attend_range(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    stride_kt,
    stride_vt,
    lo,
    hi,
    q_abs,
    pad,
    sink,
    window,
    qk_scale,
    offs_d,
    MASKED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Online-softmax update of (acc, l_i, m_i) with keys [lo, hi). Unmasked calls need whole, fully visible blocks."""
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        keys = start + offs_n
        if MASKED:
            in_range = keys < hi
            k = tl.load(k_base + keys[:, None] * stride_kt + offs_d[None, :], mask=in_range[:, None], other=0.0)
            v = tl.load(v_base + keys[:, None] * stride_vt + offs_d[None, :], mask=in_range[:, None], other=0.0)
        else:
            k = tl.load(k_base + keys[:, None] * stride_kt + offs_d[None, :])
            v = tl.load(v_base + keys[:, None] * stride_vt + offs_d[None, :])
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:
            rel = q_abs[:, None] - keys[None, :]
            visible = in_range[None, :] & (keys[None, :] >= pad) & (rel >= 0)
            visible = visible & (((keys[None, :] - pad) < sink) | (rel < window))
            qk = tl.where(visible, qk, float("-inf"))
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, qk, v, PRECISION)
    return acc, l_i, m_i


@triton.jit
def _streaming_prefill_kernel(
    Q,
    K,
    V,
    O,
    PAD,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_ob,
    stride_oh,
    stride_ot,
    heads,
    q_len,
    kv_len,
    sink,
    window,
    qk_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # last query block first: the first window / BLOCK_M query blocks see fewer keys than the rest, so they go last
    # and fill the tail of the grid
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    kv_h = h // GROUP
    pad = 0
    if HAS_PAD:
        pad = tl.load(PAD + b)

    # 64-bit base offsets: batch * stride overflows int32 at long contexts (8 x 128k x 3584 elements).
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + kv_h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kv_h.to(tl.int64) * stride_vh
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < q_len
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    q_abs = offs_m + (kv_len - q_len)

    # Key ranges of this query block (absolute key indices). Rows past q_len are never stored.
    row_lo = pid_m * BLOCK_M + (kv_len - q_len)
    row_hi = tl.minimum(row_lo + BLOCK_M, kv_len)
    win_lo = tl.maximum(row_lo - window + 1, pad)
    sink_hi = tl.minimum(pad + sink, win_lo)
    # Whole blocks starting at full_lo are visible to every row: causal for the first row, in-window for the last.
    full_lo = tl.maximum(win_lo, row_hi - window)
    n_full = tl.maximum(row_lo + 1 - full_lo, 0) // BLOCK_N
    full_hi = full_lo + n_full * BLOCK_N

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    acc, l_i, m_i = _attend_range(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, pad, sink_hi, q_abs, pad, sink, window,
        qk_scale, offs_d, True, BLOCK_N, PRECISION,
    )
    acc, l_i, m_i = _attend_range(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, win_lo, full_lo, q_abs, pad, sink, window,
        qk_scale, offs_d, True, BLOCK_N, PRECISION,
    )
    acc, l_i, m_i = _attend_range(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, full_lo, full_hi, q_abs, pad, sink, window,
        qk_scale, offs_d, False, BLOCK_N, PRECISION,
    )
    acc, l_i, m_i = _attend_range(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, full_hi, row_hi, q_abs, pad, sink, window,
        qk_scale, offs_d, True, BLOCK_N, PRECISION,
    )

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None])


def _default_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). bf16/fp16 head_dim 128 measured on an H100 at 128k (sink 128,
    window 2048): 128x128/8 warps/3 stages 10.7 ms, 128x64/8/3 12.7 ms, 64x64/4/4 13.2 ms, 128x64/4/3 18.9 ms.
    fp32 tiles are halved to fit shared memory."""
    if device.type != "cuda":
        return 16, 16, 4, 1
    if dtype == torch.float32:
        return 64, 32, 4, 2
    if head_dim <= 64:
        return 128, 64, 4, 3
    return 128, 128, 8, 3


def streaming_attention_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink: int,
    window: int | None,
    kv_pad: torch.Tensor | None = None,
    scale: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    dense_last: int = 0,
) -> torch.Tensor:
    """Streaming attention forward: q [B, H, Tq, D], k/v [B, Hkv, Tk, D] (any strides with unit head_dim stride).

    ``kv_pad`` [B] integer: left-padding count of each sample in the key sequence (None = no padding).
    ``window=None`` gives plain causal attention (all causal key blocks are visited, so it is O(T^2)).
    ``dense_last``: queries at the last ``dense_last`` key indices (the last real tokens of every left-padded
    sample) attend every causal key, the rest sink + window (the triangle pattern). Those rows are recomputed by
    ``split_k_attention`` after the streaming launch (the block/warp/stage overrides apply to the streaming launch).
    Returns [B, H, Tq, D] in q's dtype. Its memory is laid out as [B, Tq, H, D], so ``out.transpose(1, 2)`` is
    contiguous and ``.reshape(B, Tq, H * D)`` for an output projection is free.
    Block/warp/stage overrides exist for tuning and for interpreter tests; defaults suit Hopper.
    """
    what = "streaming_attention_prefill"
    batch, heads, kv_heads, q_len, kv_len, head_dim = check_qkv(q, k, v, what)
    check_pattern(sink, window, what)
    if not isinstance(dense_last, int) or isinstance(dense_last, bool) or dense_last < 0:
        raise ValueError(f"{what}: dense_last={dense_last!r} must be an integer >= 0 (0 = no dense rows)")
    if q_len > kv_len:
        raise ValueError(f"{what}: q_len={q_len} exceeds kv_len={kv_len}; queries must be the last Tq keys")
    pad = check_per_sample(kv_pad, batch, "kv_pad", q.device, what)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    eff_window = kv_len + 1 if window is None else min(int(window), kv_len + 1)

    cfg = _default_config(head_dim, q.dtype, q.device)
    bm, bn = block_m or cfg[0], block_n or cfg[1]
    warps, stages = num_warps or cfg[2], num_stages or cfg[3]

    out = torch.empty(batch, q_len, heads, head_dim, dtype=q.dtype, device=q.device).transpose(1, 2)
    if q_len == 0:
        return out
    grid = (triton.cdiv(q_len, bm), batch * heads)
    _streaming_prefill_kernel[grid](
        q, k, v, out, pad if pad is not None else q,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        heads, q_len, kv_len, int(sink), eff_window, scale * LOG2E,
        GROUP=heads // kv_heads, HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn, HAS_PAD=pad is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=warps, num_stages=stages,
    )
    band = min(dense_last, q_len)
    if band:
        split_k_attention(q[:, :, q_len - band:], k, v, kv_pad, scale, out=out[:, :, q_len - band:])
    return out
