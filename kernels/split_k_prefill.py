"""Triton split-K causal attention for a few queries over many keys: the triangle pattern's dense band.

Why: the triangle pattern's last ``last_q`` queries see every causal key (128k at a 128k prompt) while all other
queries see sink + window (~2k). As extra rows of the streaming kernel those few query blocks were programs ~60x
longer than the rest that ran on alone after the rest of the grid had finished (triangle attention alone measured
24% slower than streaming at 128k on an H200). Here the keys are cut into equal chunks and every (query tile of one
head, chunk) is its own program that writes a partial softmax; ``split_merge`` combines the partials. It is
flash-decoding for a block of queries instead of one.

Semantics of ``flux_kernels.reference.streaming_attention_reference(q, k, v, kv_pad)`` (plain causal): the queries
are the last Tq of the Tk keys, keys before a sample's left padding ``kv_pad`` are invisible, GQA, and rows with no
visible key (padding rows, e.g. a sample with fewer real tokens than Tq) return zeros.

Launch shape: grid (H, splits, B x query tiles). Heads vary fastest, so the GROUP query heads that share a kv head
read the same key chunk at about the same time (one read from HBM, the others from L2). The chunk length depends
only on (B, H, Tq, Tk) and the GPU, never on data: ~8 programs per SM (the split-KV decode kernel's measured
choice), and at least 4 key blocks per chunk so that the merge stays cheaper than what the split saves.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from flux_kernels._checks import check_per_sample, check_qkv
from flux_kernels.online_softmax import attend_causal_range
from flux_kernels.split_merge import merge_split_partials, split_partials

LOG2E = 1.4426950408889634
PROGRAMS_PER_SM = 8
MIN_BLOCKS_PER_CHUNK = 4


@triton.jit
def _split_k_kernel(
    Q, K, V, PAD, ACC, M, L,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    heads, q_len, kv_len, n_tiles, chunk, num_splits, qk_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
):
    h = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2) // n_tiles
    tile = tl.program_id(2) % n_tiles
    kv_h = h // GROUP
    pad = 0
    if HAS_PAD:
        pad = tl.load(PAD + b)

    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + kv_h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kv_h.to(tl.int64) * stride_vh

    offs_t = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_t < q_len
    q = tl.load(q_base + offs_t[:, None].to(tl.int64) * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    rows = offs_t + (kv_len - q_len)  # each query's absolute key index
    first = tile * BLOCK_M + (kv_len - q_len)

    # This split's keys, clipped to real keys and to the tile's last query; the whole blocks at the start are
    # visible to every row (causal for the first row), the rest (the diagonal) is masked per row.
    lo = tl.maximum(split * chunk, pad)
    hi = tl.minimum(split * chunk + chunk, tl.minimum(first + BLOCK_M, kv_len))
    full_hi = lo + tl.maximum(tl.minimum(hi, first + 1) - lo, 0) // BLOCK_N * BLOCK_N

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = attend_causal_range(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, lo, full_hi, rows,
                                        pad, qk_scale, offs_d, False, BLOCK_N, PRECISION)
    acc, l_i, m_i = attend_causal_range(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, full_hi, hi, rows,
                                        pad, qk_scale, offs_d, True, BLOCK_N, PRECISION)

    # split_merge's layout: row (b, t, h) = (b * Tq + t) * H + h, its splits contiguous
    part = ((b * q_len + offs_t).to(tl.int64) * heads + h) * num_splits + split
    tl.store(M + part, m_i, mask=row_ok)
    tl.store(L + part, l_i, mask=row_ok)
    tl.store(ACC + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_ok[:, None])


def _tiles(q_len: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): 64-query tiles (the triangle default band is 64 queries; fewer
    queries take a smaller power of two, at least 16 for tl.dot), 64-key blocks; fp32 key blocks halved for shared
    memory. Not yet tuned on a GPU."""
    if device.type != "cuda":
        bm, bn, warps, stages = 16, 16, 4, 1
    elif dtype == torch.float32:
        bm, bn, warps, stages = 64, 32, 4, 2
    else:
        bm, bn, warps, stages = 64, 64, 4, 3
    return min(bm, max(16, triton.next_power_of_2(q_len))), bn, warps, stages


def split_k_chunk(batch: int, heads: int, n_tiles: int, kv_len: int, block_n: int, sms: int) -> int:
    """Keys per split: enough splits that B x H x tiles x splits is ~PROGRAMS_PER_SM per SM (``sms`` of them),
    chunks a whole number of at least MIN_BLOCKS_PER_CHUNK key blocks. Static given the shapes (no data read)."""
    want_splits = max(1, triton.cdiv(PROGRAMS_PER_SM * sms, batch * heads * n_tiles))
    return max(MIN_BLOCKS_PER_CHUNK * block_n, triton.cdiv(triton.cdiv(kv_len, want_splits), block_n) * block_n)


def split_k_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_pad: torch.Tensor | None = None,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    chunk: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Causal attention of q [B, H, Tq, D], the last Tq positions of k/v [B, Hkv, Tk, D], parallel over key chunks.

    Made for few queries over many keys (Tq = the triangle pattern's ``last_q``); any Tq <= Tk is correct.
    ``kv_pad`` [B] integer: left-padding count of each sample in the key sequence (None = no padding).
    ``out``: where to write the result, [B, H, Tq, D] in q's dtype, any strides with unit stride in D (e.g. the last
    rows of a streaming prefill's output); by default a new tensor laid out as [B, Tq, H, D].
    ``chunk`` (keys per split, a positive multiple of the key block) and the tile overrides exist for tests and
    tuning; the default chunk comes from ``split_k_chunk``.
    """
    what = "split_k_attention"
    batch, heads, kv_heads, q_len, kv_len, head_dim = check_qkv(q, k, v, what)
    if q_len > kv_len:
        raise ValueError(f"{what}: q_len={q_len} exceeds kv_len={kv_len}; queries must be the last Tq keys")
    pad = check_per_sample(kv_pad, batch, "kv_pad", q.device, what)
    if out is None:
        out = torch.empty(batch, q_len, heads, head_dim, dtype=q.dtype, device=q.device).transpose(1, 2)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"{what}: out must match q ({tuple(q.shape)}, {q.dtype}, {q.device}) with unit stride in "
                         f"head_dim, got {tuple(out.shape)}, {out.dtype}, {out.device}, stride {out.stride()}")
    if q_len == 0:
        return out
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    bm, bn, warps, stages = _tiles(q_len, head_dim, q.dtype, q.device)
    bm, bn, warps, stages = block_m or bm, block_n or bn, num_warps or warps, num_stages or stages
    n_tiles = triton.cdiv(q_len, bm)
    if chunk is None:
        on_gpu = q.device.type == "cuda"
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if on_gpu else 4
        chunk = split_k_chunk(batch, heads, n_tiles, kv_len, bn, sms)
    elif not isinstance(chunk, int) or chunk <= 0 or chunk % bn != 0:
        raise ValueError(f"{what}: chunk={chunk!r} must be a positive multiple of block_n={bn}")
    num_splits = triton.cdiv(kv_len, chunk)

    part_acc, part_m, part_l = split_partials(batch * q_len * heads, num_splits, head_dim, q.device)
    _split_k_kernel[(heads, num_splits, batch * n_tiles)](
        q, k, v, pad if pad is not None else part_m, part_acc, part_m, part_l,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        heads, q_len, kv_len, n_tiles, chunk, num_splits, scale * LOG2E,
        GROUP=heads // kv_heads, HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn, HAS_PAD=pad is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=warps, num_stages=stages,
    )
    merge_split_partials(part_acc, part_m, part_l, out, num_splits)
    return out
