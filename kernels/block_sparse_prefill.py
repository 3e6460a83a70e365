"""Triton block-sparse causal prefill attention: each query block attends only its listed key blocks.

Why: XAttention keeps a few key blocks per (head, query block); attention over only those costs O(kept blocks)
instead of O(T^2). Semantics of ``flux_kernels.reference.block_sparse_attention_reference``: causal, left padding
per sample (``kv_pad``), GQA, rows without any visible key (padding rows) return zeros. The lists come from
``flux_kernels.block_select.block_lists``: kv_blocks [B, H, NB, >= max count] and counts [B, H, NB].

One program owns BLOCK_M rows of one (batch, head) inside one query block and walks that block's list. Blocks
strictly below the diagonal and clear of padding and of the sequence end are visible to every row and run
unmasked; the diagonal block (causal), a block cut by padding, and the last partial block run masked. Programs
run last query block first: late blocks have the longest lists.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from flux_kernels._checks import check_per_sample, check_qkv
from flux_kernels.online_softmax import attend_causal_range

LOG2E = 1.4426950408889634


@triton.jit
def _block_sparse_kernel(
    Q, K, V, O, KV_BLOCKS, KV_COUNT, PAD,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_lb, stride_lh, stride_lq,
    stride_cb, stride_ch,
    heads, seq_len, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_PAD: tl.constexpr, PRECISION: tl.constexpr,
):
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    kv_h = h // GROUP
    pad = 0
    if HAS_PAD:
        pad = tl.load(PAD + b)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + kv_h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kv_h.to(tl.int64) * stride_vh
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh

    row_lo = tile * BLOCK_M
    rows = row_lo + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < seq_len
    q = tl.load(q_base + rows[:, None].to(tl.int64) * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    q_block = row_lo // BLOCK_SIZE
    row_end = tl.minimum(row_lo + BLOCK_M, seq_len)  # keys at or past the last row are never visible
    list_base = KV_BLOCKS + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_block.to(tl.int64) * stride_lq
    count = tl.load(KV_COUNT + b.to(tl.int64) * stride_cb + h.to(tl.int64) * stride_ch + q_block)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for i in range(count):
        kb = tl.load(list_base + i)
        lo = kb * BLOCK_SIZE
        hi = tl.minimum(lo + BLOCK_SIZE, row_end)
        if (kb >= q_block) | (lo < pad) | (lo + BLOCK_SIZE > seq_len):
            acc, l_i, m_i = attend_causal_range(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, lo, hi, rows,
                                                pad, qk_scale, offs_d, True, BLOCK_N, PRECISION)
        else:
            acc, l_i, m_i = attend_causal_range(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, lo, hi, rows,
                                                pad, qk_scale, offs_d, False, BLOCK_N, PRECISION)

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(o_base + rows[:, None].to(tl.int64) * stride_ot + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])


def _default_tiles(block_size: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages), each tile dividing block_size. Hopper bf16: 128 x 64 for head dim
    128 as in the streaming kernel; smaller on CPU (the interpreter) and for fp32 (shared memory)."""
    if device.type != "cuda":
        bm = bn = 16
        warps, stages = 4, 1
    elif dtype == torch.float32:
        bm, bn, warps, stages = 64, 32, 4, 2
    elif head_dim <= 64:
        bm, bn, warps, stages = 128, 64, 4, 3
    else:
        bm, bn, warps, stages = 128, 64, 8, 3
    return min(bm, block_size), min(bn, block_size), warps, stages


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_blocks: torch.Tensor,
    kv_counts: torch.Tensor,
    block_size: int,
    kv_pad: torch.Tensor | None = None,
    scale: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Block-sparse causal attention of a prompt: q [B, H, T, D], k/v [B, Hkv, T, D] (unit head_dim stride).

    kv_blocks [B, H, NB, L] int32 (first ``kv_counts[b, h, i]`` entries: key blocks of query block i, each at most
    i and none twice), kv_counts [B, H, NB] int32. Returns [B, H, T, D] in q's dtype, laid out as [B, T, H, D].
    ``block_m``/``block_n`` (query rows per program, keys per step; each must divide block_size), ``num_warps`` and
    ``num_stages`` override the default tiling (experiments/patterns/xattn_scoring_bench.py --attn-tiles times
    alternatives on a GPU).
    """
    what = "block_sparse_attention"
    batch, heads, kv_heads, q_len, kv_len, head_dim = check_qkv(q, k, v, what)
    if q_len != kv_len:
        raise ValueError(f"{what}: attends a whole prompt, so q and k need the same length (got {q_len}, {kv_len})")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"{what}: block_size={block_size} must be a power of two >= 16 (tl.dot's smallest tile)")
    n_blocks = triton.cdiv(q_len, block_size)
    if kv_blocks.dim() != 4 or kv_blocks.shape[:3] != (batch, heads, n_blocks) or kv_blocks.dtype != torch.int32:
        raise ValueError(f"{what}: kv_blocks must be int32 [B, H, NB, L] = [{batch}, {heads}, {n_blocks}, L], "
                         f"got {kv_blocks.dtype} {tuple(kv_blocks.shape)}")
    if kv_counts.shape != (batch, heads, n_blocks) or kv_counts.dtype != torch.int32:
        raise ValueError(f"{what}: kv_counts must be int32 [B, H, NB] = [{batch}, {heads}, {n_blocks}], "
                         f"got {kv_counts.dtype} {tuple(kv_counts.shape)}")
    if kv_blocks.stride(-1) != 1 or kv_counts.stride(-1) != 1:
        raise ValueError(f"{what}: kv_blocks and kv_counts must be contiguous in their last dimension; call "
                         ".contiguous()")
    pad = check_per_sample(kv_pad, batch, "kv_pad", q.device, what)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    bm, bn, warps, stages = _default_tiles(block_size, head_dim, q.dtype, q.device)
    bm, bn = block_m or bm, block_n or bn
    warps, stages = num_warps or warps, num_stages or stages
    if block_size % bm or block_size % bn:
        raise ValueError(f"{what}: block_m={bm} and block_n={bn} must divide block_size={block_size}")
    out = torch.empty(batch, q_len, heads, head_dim, dtype=q.dtype, device=q.device).transpose(1, 2)
    if q_len == 0:
        return out
    grid = (triton.cdiv(q_len, bm), batch * heads)
    _block_sparse_kernel[grid](
        q, k, v, out, kv_blocks, kv_counts, pad if pad is not None else kv_counts,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        kv_blocks.stride(0), kv_blocks.stride(1), kv_blocks.stride(2),
        kv_counts.stride(0), kv_counts.stride(1),
        heads, q_len, scale * LOG2E,
        GROUP=heads // kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=bm, BLOCK_N=bn,
        HAS_PAD=pad is not None, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=warps, num_stages=stages,
    )
    return out
