"""XAttention's block importance (arXiv 2503.16428): antidiagonal scoring of stride x stride tiles, a softmax per
strided query row, and the probabilities summed per (query block, key block).

Why: block-sparse attention needs a cheap estimate of which key blocks matter to each query block. The sum along
a tile's antidiagonal touches every query row and every key column of the tile once, so it sees both vertical
and slash patterns at 1/stride of the cost of the full score matrix. ``xattn_block_scores`` is the Triton kernel
(left padding, GQA); ``xattn_block_scores_torch`` the same computation in torch for CPU, training and any padding
layout. Both follow ``flux_kernels.reference.xattn_block_scores_reference``.

Kernel layout: one program owns TILE_R strided query rows of one (batch, head) and makes two passes over the
causal strided columns: the first finds each row's softmax max and normaliser, the second recomputes the scores,
normalises them and writes their sums per key block. TILE_R and TILE_C are multiples of block_size / stride, so
every program writes whole (query block, key block) cells and no atomics are needed.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from flux_kernels._checks import check_per_sample, check_qkv

LOG2E = 1.4426950408889634


@triton.jit
def _antidiagonal_tile(q_base, k_base, stride_qt, stride_kt, rows, cols, pad, seq_len, offs_d,
                       STRIDE: tl.constexpr, TILE_R: tl.constexpr, TILE_C: tl.constexpr,
                       PRECISION: tl.constexpr):
    """[TILE_R, TILE_C] antidiagonal sums: sum_j q[r*S + S-1-j] . k[c*S + j]; padding and out-of-range tokens are 0."""
    acc = tl.zeros([TILE_R, TILE_C], dtype=tl.float32)
    for j in range(STRIDE):
        q_tok = rows * STRIDE + (STRIDE - 1 - j)
        k_tok = cols * STRIDE + j
        q_ok = (q_tok >= pad) & (q_tok < seq_len)
        k_ok = (k_tok >= pad) & (k_tok < seq_len)
        qj = tl.load(q_base + q_tok[:, None].to(tl.int64) * stride_qt + offs_d[None, :], mask=q_ok[:, None],
                     other=0.0)
        kj = tl.load(k_base + k_tok[:, None].to(tl.int64) * stride_kt + offs_d[None, :], mask=k_ok[:, None],
                     other=0.0)
        acc += tl.dot(qj, tl.trans(kj), input_precision=PRECISION)
    return acc


@triton.jit
def _strided_logits(q_base, k_base, stride_qt, stride_kt, rows, row_ok, c0, pad, seq_len, n_strided, qk_scale,
                    offs_d, STRIDE: tl.constexpr, TILE_R: tl.constexpr, TILE_C: tl.constexpr,
                    PRECISION: tl.constexpr):
    """Scaled antidiagonal logits of strided columns c0..c0+TILE_C, -inf where the column is not causal for the row,
    holds no real key, or the row holds no real query."""
    cols = c0 + tl.arange(0, TILE_C)
    s = _antidiagonal_tile(q_base, k_base, stride_qt, stride_kt, rows, cols, pad, seq_len, offs_d,
                           STRIDE, TILE_R, TILE_C, PRECISION) * qk_scale
    col_ok = (cols < n_strided) & (cols * STRIDE + STRIDE - 1 >= pad)
    ok = row_ok[:, None] & col_ok[None, :] & (cols[None, :] <= rows[:, None])
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _xattn_scores_kernel(
    Q, K, OUT, PAD,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_ob, stride_oh, stride_oq,
    heads, seq_len, n_strided, n_blocks, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, STRIDE: tl.constexpr, PER_BLOCK: tl.constexpr,
    TILE_R: tl.constexpr, TILE_C: tl.constexpr, HAS_PAD: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    pad = 0
    if HAS_PAD:
        pad = tl.load(PAD + b)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + (h // GROUP).to(tl.int64) * stride_kh
    offs_d = tl.arange(0, HEAD_DIM)
    rows = pid_r * TILE_R + tl.arange(0, TILE_R)
    # a strided row / column counts when it holds a real token: its last token is at or after the padding
    row_ok = (rows < n_strided) & (rows * STRIDE + STRIDE - 1 >= pad)
    cols_hi = tl.minimum((pid_r + 1) * TILE_R, n_strided)

    m_i = tl.full([TILE_R], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([TILE_R], dtype=tl.float32)
    for c0 in range(0, cols_hi, TILE_C):
        s = _strided_logits(q_base, k_base, stride_qt, stride_kt, rows, row_ok, c0, pad, seq_len, n_strided,
                            qk_scale, offs_d, STRIDE, TILE_R, TILE_C, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    inv_l = tl.where(l_i > 0.0, 1.0 / tl.where(l_i > 0.0, l_i, 1.0), 0.0)

    QB: tl.constexpr = TILE_R // PER_BLOCK
    KB: tl.constexpr = TILE_C // PER_BLOCK
    q_blocks = pid_r * QB + tl.arange(0, QB)
    o_base = OUT + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    for c0 in range(0, cols_hi, TILE_C):
        s = _strided_logits(q_base, k_base, stride_qt, stride_kt, rows, row_ok, c0, pad, seq_len, n_strided,
                            qk_scale, offs_d, STRIDE, TILE_R, TILE_C, PRECISION)
        p = tl.exp2(s - m_i[:, None]) * inv_l[:, None]
        sums = tl.sum(tl.sum(tl.reshape(p, [QB, PER_BLOCK, KB, PER_BLOCK]), 3), 1)
        k_blocks = c0 // PER_BLOCK + tl.arange(0, KB)
        ptrs = o_base + q_blocks[:, None].to(tl.int64) * stride_oq + k_blocks[None, :]
        tl.store(ptrs, sums, mask=(q_blocks[:, None] < n_blocks) & (k_blocks[None, :] < n_blocks))


def check_block_params(block_size: int, stride: int, what: str) -> None:
    """block_size a power of two; stride divides it (so strided tiles never straddle two blocks)."""
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"{what}: block_size={block_size} must be a power of two (e.g. 128)")
    if stride < 1 or block_size % stride:
        raise ValueError(f"{what}: stride={stride} must be >= 1 and divide block_size={block_size} (e.g. 8 or 16)")


def _tiles(per_block: int, device: torch.device) -> tuple[int, int, int]:
    """(TILE_R, TILE_C, num_warps): at least 16 strided rows/columns (tl.dot's minimum) and whole blocks; wider
    tiles on the GPU so each dot is big enough to keep the tensor cores busy."""
    base = 64 if device.type == "cuda" else 16
    tile = max(base, per_block)
    return tile, tile, 4


def xattn_block_scores(q: torch.Tensor, k: torch.Tensor, block_size: int, stride: int,
                       kv_pad: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Block scores [B, H, NB, NB] float32 of a left-padded prompt (q and k over the same T tokens; GQA).

    Cells above the causal diagonal are 0; each real query block's row sums to its number of real strided rows.
    """
    what = "xattn_block_scores"
    batch, heads, kv_heads, q_len, kv_len, head_dim = check_qkv(q, k, k, what)
    if q_len != kv_len:
        raise ValueError(f"{what}: scores a whole prompt, so q and k need the same length (got {q_len} and {kv_len})")
    check_block_params(block_size, stride, what)
    pad = check_per_sample(kv_pad, batch, "kv_pad", q.device, what)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    n_blocks = triton.cdiv(q_len, block_size)
    n_strided = triton.cdiv(q_len, stride)
    per_block = block_size // stride
    out = torch.zeros(batch, heads, n_blocks, n_blocks, dtype=torch.float32, device=q.device)
    if q_len == 0:
        return out
    tile_r, tile_c, warps = _tiles(per_block, q.device)
    grid = (triton.cdiv(n_strided, tile_r), batch * heads)
    _xattn_scores_kernel[grid](
        q, k, out, pad if pad is not None else q,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        heads, q_len, n_strided, n_blocks, scale / stride * LOG2E,
        GROUP=heads // kv_heads, HEAD_DIM=head_dim, STRIDE=stride, PER_BLOCK=per_block,
        TILE_R=tile_r, TILE_C=tile_c, HAS_PAD=pad is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=warps,
    )
    return out


def xattn_block_scores_torch(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None, block_size: int,
                             stride: int, scale: float, max_elements: int = 1 << 26) -> torch.Tensor:
    """The same block scores in torch (float32), for any padding layout: ``valid`` [B, T] bool marks real tokens
    (None = all real). Strided rows are processed in chunks so the strided score matrix held at once stays under
    ``max_elements`` entries."""
    batch, heads, seq_len, head_dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    n_blocks = -(-seq_len // block_size)
    padded = n_blocks * block_size
    n_strided, per_block = padded // stride, block_size // stride
    real = torch.zeros(batch, padded, dtype=torch.bool, device=q.device)
    real[:, :seq_len] = True if valid is None else valid
    qz = torch.zeros(batch, heads, padded, head_dim, dtype=torch.float32, device=q.device)
    kz = torch.zeros(batch, kv_heads, padded, head_dim, dtype=torch.float32, device=q.device)
    qz[:, :, :seq_len] = q.float()
    kz[:, :, :seq_len] = k.float()
    qz, kz = qz * real[:, None, :, None], kz * real[:, None, :, None]
    # strided row r = its stride tokens in reverse order, column c = its tokens in order: one dot = one antidiagonal
    q_rows = qz.view(batch, kv_heads, group, n_strided, stride, head_dim).flip(4)
    q_rows = q_rows.reshape(batch, kv_heads, group, n_strided, stride * head_dim)
    k_cols = kz.view(batch, kv_heads, 1, n_strided, stride * head_dim)
    strided_real = real.view(batch, n_strided, stride).any(dim=-1)
    out = torch.zeros(batch, heads, n_blocks, n_blocks, dtype=torch.float32, device=q.device)
    rows_per_chunk = max(per_block, (max_elements // max(1, batch * heads * n_strided)) // per_block * per_block)
    cols = torch.arange(n_strided, device=q.device)
    for r0 in range(0, n_strided, rows_per_chunk):
        r1 = min(n_strided, r0 + rows_per_chunk)
        logits = torch.matmul(q_rows[:, :, :, r0:r1], k_cols.transpose(-1, -2)) * (scale / stride)
        rows = cols[r0:r1]
        allowed = (cols.view(1, 1, 1, 1, -1) <= rows.view(1, 1, 1, -1, 1)) & strided_real.view(batch, 1, 1, 1, -1)
        row_real = strided_real[:, r0:r1].view(batch, 1, 1, -1, 1)
        logits = logits.masked_fill(~allowed, float("-inf")).masked_fill(~row_real, 0.0)
        probs = torch.softmax(logits, dim=-1) * row_real
        probs = probs.view(batch, heads, (r1 - r0) // per_block, per_block, n_blocks, per_block)
        out[:, :, r0 // per_block:r1 // per_block] = probs.sum(dim=(3, 5))
    return out
