"""XAttention's block importance (arXiv 2503.16428): antidiagonal scoring of stride x stride tiles, a softmax per
strided query row, and the probabilities summed per (query block, key block).

Why: block-sparse attention needs a cheap estimate of which key blocks matter to each query block. The sum along
a tile's antidiagonal touches every query row and every key column of the tile once, so it sees both vertical
and slash patterns at 1/stride of the cost of the full score matrix. ``xattn_block_scores`` is the Triton kernel
(left padding, GQA); ``xattn_block_scores_torch`` the same computation in torch for CPU, training and any padding
layout. Both follow ``flux_kernels.reference.xattn_block_scores_reference``.

The strided logits are a causal GEMM: strided row r of q (its stride tokens in reverse order, stride * head_dim
long) times strided column c of k, so K = stride * head_dim (1024 at stride 8, head_dim 128) and the work is
stride x a causal q.k^T at 1/stride^2 of its cells. Two kernels compute the block scores from it:

* one pass (the default): a program owns ``rows`` strided query rows and walks their causal column tiles once,
  keeping each row's online softmax max m and normaliser l. Per tile it writes, to a float32 scratch, each row's
  partial probability sums per key block, exp2(s - m_tile), and the max m_tile they are relative to; a small
  fix-up kernel then rescales every partial by exp2(m_tile - m_final) / l_final and sums the rows of each query
  block. The scratch holds (strided rows) x (key blocks) per (sample, head), so the wrapper scores (sample, head)
  units, or row ranges of one, in groups whose scratch stays under ``max_scratch_bytes``.
* two passes (``passes=2``, no scratch; the baseline the GPU bench compares against): the first walk finds each
  row's max and normaliser, the second recomputes the logits and writes normalised block sums directly.

Tile rows/columns are multiples of block_size / stride, so every tile covers whole key blocks (no atomics), and
at least 16 (tl.dot's minimum).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from flux_kernels._checks import check_per_sample, check_qkv

LOG2E = 1.4426950408889634
MIB = 1 << 20


@triton.jit
def _antidiagonal_tile(q_base, k_base, stride_qt, stride_kt, rows, cols, pad, seq_len,
                       STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                       TILE_R: tl.constexpr, TILE_C: tl.constexpr, PRECISION: tl.constexpr):
    """[TILE_R, TILE_C] antidiagonal sums: sum_j q[r*S + S-1-j] . k[c*S + j]; padding and out-of-range tokens are 0.
    One K step is one token offset j and BLOCK_D of the head dims, so the loop (which Triton software-pipelines)
    runs STRIDE * HEAD_DIM / BLOCK_D steps."""
    D_STEPS: tl.constexpr = HEAD_DIM // BLOCK_D
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([TILE_R, TILE_C], dtype=tl.float32)
    for step in range(STRIDE * D_STEPS):
        j = step // D_STEPS
        d0 = (step % D_STEPS) * BLOCK_D
        q_tok = rows * STRIDE + (STRIDE - 1 - j)
        k_tok = cols * STRIDE + j
        q_ok = (q_tok >= pad) & (q_tok < seq_len)
        k_ok = (k_tok >= pad) & (k_tok < seq_len)
        qj = tl.load(q_base + q_tok[:, None].to(tl.int64) * stride_qt + (d0 + offs_d)[None, :], mask=q_ok[:, None],
                     other=0.0)
        kj = tl.load(k_base + k_tok[:, None].to(tl.int64) * stride_kt + (d0 + offs_d)[None, :], mask=k_ok[:, None],
                     other=0.0)
        acc += tl.dot(qj, tl.trans(kj), input_precision=PRECISION)
    return acc


@triton.jit
def _strided_logits(q_base, k_base, stride_qt, stride_kt, rows, row_ok, c0, pad, seq_len, n_strided, qk_scale,
                    STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TILE_R: tl.constexpr,
                    TILE_C: tl.constexpr, PRECISION: tl.constexpr):
    """Scaled (log2 domain) antidiagonal logits of strided columns c0..c0+TILE_C, -inf where the column is not
    causal for the row, holds no real key, or the row holds no real query."""
    cols = c0 + tl.arange(0, TILE_C)
    s = _antidiagonal_tile(q_base, k_base, stride_qt, stride_kt, rows, cols, pad, seq_len,
                           STRIDE, HEAD_DIM, BLOCK_D, TILE_R, TILE_C, PRECISION) * qk_scale
    col_ok = (cols < n_strided) & (cols * STRIDE + STRIDE - 1 >= pad)
    ok = row_ok[:, None] & col_ok[None, :] & (cols[None, :] <= rows[:, None])
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _row_setup(Q, K, PAD, unit, tile, stride_qb, stride_qh, stride_kb, stride_kh, heads, n_strided,
               GROUP: tl.constexpr, STRIDE: tl.constexpr, TILE_R: tl.constexpr, HAS_PAD: tl.constexpr):
    """Base pointers, padding, the tile's strided rows and which of them hold a real query, for (sample, head)
    unit `unit` = b * heads + h."""
    b = unit // heads
    h = unit % heads
    pad = 0
    if HAS_PAD:
        pad = tl.load(PAD + b)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + (h // GROUP).to(tl.int64) * stride_kh
    rows = tile * TILE_R + tl.arange(0, TILE_R)
    # a strided row / column counts when it holds a real token: its last token is at or after the padding
    row_ok = (rows < n_strided) & (rows * STRIDE + STRIDE - 1 >= pad)
    return q_base, k_base, pad, rows, row_ok


@triton.jit
def _xattn_partials_kernel(
    Q, K, PART, TILE_MAX, ROW_MAX, ROW_SUM, PAD,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_pu, stride_pr, stride_tu, stride_tr, stride_ru,
    unit0, tile0, heads, seq_len, n_strided, n_blocks, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, STRIDE: tl.constexpr,
    PER_BLOCK: tl.constexpr, TILE_R: tl.constexpr, TILE_C: tl.constexpr, HAS_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One pass over the causal column tiles of TILE_R strided rows of one (sample, head): per tile, the rows'
    probability sums per key block relative to the running max (PART [unit, row, key block]) and that max
    (TILE_MAX [unit, row, column tile]); after the last tile the final max and normaliser (ROW_MAX, ROW_SUM)."""
    u = tl.program_id(0)
    # heaviest row tiles (most causal columns) first, every unit's at once: the launch ends with the light ones
    tile = tile0 + tl.num_programs(1) - 1 - tl.program_id(1)
    q_base, k_base, pad, rows, row_ok = _row_setup(Q, K, PAD, unit0 + u, tile, stride_qb, stride_qh, stride_kb,
                                                   stride_kh, heads, n_strided, GROUP, STRIDE, TILE_R, HAS_PAD)
    local = (tile - tile0) * TILE_R + tl.arange(0, TILE_R)  # row within this launch's scratch
    part_base = PART + u.to(tl.int64) * stride_pu + local[:, None].to(tl.int64) * stride_pr
    tmax_base = TILE_MAX + u.to(tl.int64) * stride_tu + local.to(tl.int64) * stride_tr
    KB: tl.constexpr = TILE_C // PER_BLOCK
    m_i = tl.full([TILE_R], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([TILE_R], dtype=tl.float32)
    cols_hi = tl.minimum((tile + 1) * TILE_R, n_strided)
    for c0 in range(0, cols_hi, TILE_C):
        s = _strided_logits(q_base, k_base, stride_qt, stride_kt, rows, row_ok, c0, pad, seq_len, n_strided,
                            qk_scale, STRIDE, HEAD_DIM, BLOCK_D, TILE_R, TILE_C, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        part = tl.sum(tl.reshape(tl.exp2(s - m_new[:, None]), [TILE_R, KB, PER_BLOCK]), 2)
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(part, 1)
        m_i = m_new
        k_blocks = c0 // PER_BLOCK + tl.arange(0, KB)
        tl.store(part_base + k_blocks[None, :], part, mask=k_blocks[None, :] < n_blocks)
        tl.store(tmax_base + c0 // TILE_C, m_i)
    tl.store(ROW_MAX + u.to(tl.int64) * stride_ru + local, m_i)
    tl.store(ROW_SUM + u.to(tl.int64) * stride_ru + local, l_i)


@triton.jit
def _xattn_fixup_kernel(
    PART, TILE_MAX, ROW_MAX, ROW_SUM, OUT,
    stride_pu, stride_pr, stride_tu, stride_tr, stride_ru, stride_ou, stride_oq,
    unit0, qb0,
    PER_BLOCK: tl.constexpr, KB_PER_TILE: tl.constexpr, BLOCK_KB: tl.constexpr,
):
    """Block scores of one query block of one unit: its rows' partials rescaled to the rows' final max and
    normaliser, summed over the rows; only key blocks <= the query block (the rest of OUT stays 0)."""
    u = tl.program_id(0)
    i = tl.program_id(1)
    qb = qb0 + i
    local = i * PER_BLOCK + tl.arange(0, PER_BLOCK)
    m = tl.load(ROW_MAX + u.to(tl.int64) * stride_ru + local)
    l = tl.load(ROW_SUM + u.to(tl.int64) * stride_ru + local)
    inv_l = tl.where(l > 0.0, 1.0 / tl.where(l > 0.0, l, 1.0), 0.0)  # rows without a real query weigh nothing
    part_base = PART + u.to(tl.int64) * stride_pu + local[:, None].to(tl.int64) * stride_pr
    tmax_base = TILE_MAX + u.to(tl.int64) * stride_tu + local[:, None].to(tl.int64) * stride_tr
    o_base = OUT + (unit0 + u).to(tl.int64) * stride_ou + qb.to(tl.int64) * stride_oq
    for kb0 in range(0, qb + 1, BLOCK_KB):
        k_blocks = kb0 + tl.arange(0, BLOCK_KB)
        ok = k_blocks <= qb
        part = tl.load(part_base + k_blocks[None, :], mask=ok[None, :], other=0.0)
        tmax = tl.load(tmax_base + (k_blocks // KB_PER_TILE)[None, :], mask=ok[None, :], other=float("-inf"))
        weight = tl.exp2(tmax - m[:, None]) * inv_l[:, None]  # tmax <= m: the running max only grows
        tl.store(o_base + k_blocks, tl.sum(part * weight, 0), mask=ok)


@triton.jit
def _xattn_two_pass_kernel(
    Q, K, OUT, PAD,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_ou, stride_oq,
    heads, seq_len, n_strided, n_blocks, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, STRIDE: tl.constexpr,
    PER_BLOCK: tl.constexpr, TILE_R: tl.constexpr, TILE_C: tl.constexpr, HAS_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Two walks over the causal column tiles: row max and normaliser, then the normalised block sums."""
    unit = tl.program_id(0)
    tile = tl.num_programs(1) - 1 - tl.program_id(1)
    q_base, k_base, pad, rows, row_ok = _row_setup(Q, K, PAD, unit, tile, stride_qb, stride_qh, stride_kb,
                                                   stride_kh, heads, n_strided, GROUP, STRIDE, TILE_R, HAS_PAD)
    cols_hi = tl.minimum((tile + 1) * TILE_R, n_strided)
    m_i = tl.full([TILE_R], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([TILE_R], dtype=tl.float32)
    for c0 in range(0, cols_hi, TILE_C):
        s = _strided_logits(q_base, k_base, stride_qt, stride_kt, rows, row_ok, c0, pad, seq_len, n_strided,
                            qk_scale, STRIDE, HEAD_DIM, BLOCK_D, TILE_R, TILE_C, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    inv_l = tl.where(l_i > 0.0, 1.0 / tl.where(l_i > 0.0, l_i, 1.0), 0.0)

    QB: tl.constexpr = TILE_R // PER_BLOCK
    KB: tl.constexpr = TILE_C // PER_BLOCK
    q_blocks = tile * QB + tl.arange(0, QB)
    o_base = OUT + unit.to(tl.int64) * stride_ou
    for c0 in range(0, cols_hi, TILE_C):
        s = _strided_logits(q_base, k_base, stride_qt, stride_kt, rows, row_ok, c0, pad, seq_len, n_strided,
                            qk_scale, STRIDE, HEAD_DIM, BLOCK_D, TILE_R, TILE_C, PRECISION)
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


@dataclass(frozen=True)
class ScoreTiles:
    """A launch configuration of the scoring kernels: ``rows`` x ``cols`` strided rows/columns per tile,
    ``dim`` head dims per K step (capped at head_dim), ``warps`` and ``stages`` (software-pipelining depth of the
    K loop). Bigger tiles load each q and k element fewer times per FLOP (the GEMM's K is stride * head_dim, so
    operands cannot stay in registers and stream from L2 for every tile)."""

    rows: int
    cols: int
    dim: int
    warps: int
    stages: int

    @property
    def name(self) -> str:
        return f"r{self.rows}c{self.cols}d{self.dim}w{self.warps}s{self.stages}"

    def fitted(self, per_block: int, head_dim: int) -> ScoreTiles:
        """Rows/columns raised to block_size / stride when smaller (tiles cover whole key blocks); dim capped."""
        return ScoreTiles(max(self.rows, per_block), max(self.cols, per_block), min(self.dim, head_dim),
                          self.warps, self.stages)


# Named configurations the GPU bench (experiments/patterns/xattn_scoring_bench.py) times. r64c64d128w4s3 is the
# earlier two-pass kernel's tiling; the larger ones are the usual Hopper bf16 GEMM tilings.
SCORE_TILES = {t.name: t for t in (
    ScoreTiles(16, 16, 128, 4, 1),      # CPU interpreter: small tiles keep numpy fast
    ScoreTiles(64, 64, 32, 4, 2),       # CUDA float32 inputs: fp32 operands need half the shared memory
    ScoreTiles(64, 64, 128, 4, 3),
    ScoreTiles(128, 64, 64, 4, 3),
    ScoreTiles(128, 128, 64, 8, 3),
    ScoreTiles(128, 128, 128, 8, 2),
    ScoreTiles(128, 256, 64, 8, 3),
    ScoreTiles(256, 128, 64, 8, 3),
    ScoreTiles(128, 256, 64, 8, 4),
    ScoreTiles(128, 256, 32, 8, 4),
    ScoreTiles(64, 256, 64, 4, 3),
)}
DEFAULT_MAX_SCRATCH_BYTES = 512 * MIB


def default_tiles(dtype: torch.dtype, device: torch.device) -> ScoreTiles:
    """The tiling used when ``tiles`` is not given. CUDA bf16/fp16: 128 x 256 tiles, 8 warps, 3 stages, the fastest
    of the tilings timed on an H200 (experiments/patterns/xattn_scoring.md: 420 TFLOP/s at 128k, against 313 for
    128 x 128 and 141 for the two-pass kernel)."""
    if device.type != "cuda":
        return SCORE_TILES["r16c16d128w4s1"]
    if dtype == torch.float32:
        return SCORE_TILES["r64c64d32w4s2"]
    return SCORE_TILES["r128c256d64w8s3"]


def _resolve_tiles(tiles: str | ScoreTiles | None, q: torch.Tensor, per_block: int, head_dim: int,
                   what: str) -> ScoreTiles:
    if tiles is None:
        chosen = default_tiles(q.dtype, q.device)
    elif isinstance(tiles, ScoreTiles):
        chosen = tiles
    elif tiles in SCORE_TILES:
        chosen = SCORE_TILES[tiles]
    else:
        raise ValueError(f"{what}: tiles={tiles!r} is not a known tiling; use one of {', '.join(SCORE_TILES)} "
                         "or a ScoreTiles")
    for field in ("rows", "cols", "dim"):
        value = getattr(chosen, field)
        if value < 16 or value & (value - 1):
            raise ValueError(f"{what}: tiles.{field}={value} must be a power of two >= 16 (e.g. 64 or 128)")
    return chosen.fitted(per_block, head_dim)


def xattn_block_scores(q: torch.Tensor, k: torch.Tensor, block_size: int, stride: int,
                       kv_pad: torch.Tensor | None = None, scale: float | None = None, *,
                       tiles: str | ScoreTiles | None = None, passes: int = 1,
                       max_scratch_bytes: int = DEFAULT_MAX_SCRATCH_BYTES) -> torch.Tensor:
    """Block scores [B, H, NB, NB] float32 of a left-padded prompt (q and k over the same T tokens; GQA).

    Cells above the causal diagonal are 0; each real query block's row sums to its number of real strided rows.
    ``tiles``: a name from ``SCORE_TILES`` or a ``ScoreTiles`` (None: ``default_tiles``). ``passes``: 1 (one walk
    plus a float32 scratch of at most ``max_scratch_bytes``) or 2 (two walks, no scratch).
    """
    what = "xattn_block_scores"
    batch, heads, kv_heads, q_len, kv_len, head_dim = check_qkv(q, k, k, what)
    if q_len != kv_len:
        raise ValueError(f"{what}: scores a whole prompt, so q and k need the same length (got {q_len} and {kv_len})")
    check_block_params(block_size, stride, what)
    if passes not in (1, 2):
        raise ValueError(f"{what}: passes={passes!r} must be 1 (one walk and a scratch) or 2 (two walks)")
    pad = check_per_sample(kv_pad, batch, "kv_pad", q.device, what)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    n_blocks = triton.cdiv(q_len, block_size)
    per_block = block_size // stride
    tile = _resolve_tiles(tiles, q, per_block, head_dim, what)
    out = torch.zeros(batch, heads, n_blocks, n_blocks, dtype=torch.float32, device=q.device)
    if q_len == 0:
        return out
    launch = _Launch(q, k, out, pad, heads, kv_heads, q_len, triton.cdiv(q_len, stride), n_blocks, head_dim, stride,
                     per_block, scale / stride * LOG2E, tile)
    if passes == 2:
        launch.two_pass()
    else:
        launch.one_pass(int(max_scratch_bytes), what)
    return out


@dataclass
class _Launch:
    """The arguments both scoring kernels share, and how each is launched over (sample, head) units."""

    q: torch.Tensor
    k: torch.Tensor
    out: torch.Tensor
    pad: torch.Tensor | None
    heads: int
    kv_heads: int
    seq_len: int
    n_strided: int
    n_blocks: int
    head_dim: int
    stride: int
    per_block: int
    qk_scale: float
    tile: ScoreTiles

    def _common(self) -> tuple[list, dict]:
        q, k = self.q, self.k
        args = [q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2)]
        meta = dict(GROUP=self.heads // self.kv_heads, HEAD_DIM=self.head_dim, BLOCK_D=self.tile.dim,
                    STRIDE=self.stride, PER_BLOCK=self.per_block, TILE_R=self.tile.rows, TILE_C=self.tile.cols,
                    HAS_PAD=self.pad is not None, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                    num_warps=self.tile.warps, num_stages=self.tile.stages)
        return args, meta

    def two_pass(self) -> None:
        units = self.out.shape[0] * self.heads
        out = self.out.view(units, self.n_blocks, self.n_blocks)
        strides, meta = self._common()
        grid = (units, triton.cdiv(self.n_strided, self.tile.rows))
        _xattn_two_pass_kernel[grid](
            self.q, self.k, out, self.pad if self.pad is not None else self.q, *strides,
            out.stride(0), out.stride(1), self.heads, self.seq_len, self.n_strided, self.n_blocks, self.qk_scale,
            **meta,
        )

    def scratch_plan(self, max_scratch_bytes: int, what: str) -> tuple[int, int]:
        """(units, row tiles) per one-pass launch: every row tile of as many units as fit, or when one unit alone
        is over the bound, as many of its row tiles as fit."""
        units = self.out.shape[0] * self.heads
        n_tiles = triton.cdiv(self.n_strided, self.tile.rows)
        n_col_tiles = triton.cdiv(self.n_strided, self.tile.cols)
        tile_bytes = 4 * self.tile.rows * (self.n_blocks + n_col_tiles + 2)  # partials, tile maxima, max and sum
        if tile_bytes > max_scratch_bytes:
            raise ValueError(f"{what}: max_scratch_bytes={max_scratch_bytes} is below the {tile_bytes} bytes one "
                             f"tile of {self.tile.rows} strided rows needs at {self.seq_len} tokens; raise it "
                             f"(default {DEFAULT_MAX_SCRATCH_BYTES})")
        tiles_per_launch = min(n_tiles, max_scratch_bytes // tile_bytes)
        return max(1, min(units, max_scratch_bytes // (tile_bytes * n_tiles))), tiles_per_launch

    def one_pass(self, max_scratch_bytes: int, what: str) -> None:
        """Score the (sample, head) units in groups (or, when one unit's scratch alone is over the bound, a unit's
        row tiles in ranges) so the float32 scratch stays under ``max_scratch_bytes``: at 128k tokens, stride 8,
        block 128 one head's partials take 64 MiB, so all 28 heads of a 7B layer at once would hold 1.8 GiB."""
        units = self.out.shape[0] * self.heads
        out = self.out.view(units, self.n_blocks, self.n_blocks)
        n_tiles = triton.cdiv(self.n_strided, self.tile.rows)
        n_col_tiles = triton.cdiv(self.n_strided, self.tile.cols)
        units_per_launch, tiles_per_launch = self.scratch_plan(max_scratch_bytes, what)
        rows = tiles_per_launch * self.tile.rows
        dev = self.q.device
        part = torch.empty(units_per_launch, rows, self.n_blocks, dtype=torch.float32, device=dev)
        tile_max = torch.empty(units_per_launch, rows, n_col_tiles, dtype=torch.float32, device=dev)
        row_stats = torch.empty(2, units_per_launch, rows, dtype=torch.float32, device=dev)
        strides, meta = self._common()
        for unit0 in range(0, units, units_per_launch):
            n_units = min(units_per_launch, units - unit0)
            for tile0 in range(0, n_tiles, tiles_per_launch):
                n_launch_tiles = min(tiles_per_launch, n_tiles - tile0)
                _xattn_partials_kernel[(n_units, n_launch_tiles)](
                    self.q, self.k, part, tile_max, row_stats[0], row_stats[1],
                    self.pad if self.pad is not None else self.q, *strides,
                    part.stride(0), part.stride(1), tile_max.stride(0), tile_max.stride(1), row_stats.stride(1),
                    unit0, tile0, self.heads, self.seq_len, self.n_strided, self.n_blocks, self.qk_scale, **meta,
                )
                qb0 = tile0 * self.tile.rows // self.per_block
                qb1 = min(self.n_blocks, (tile0 + n_launch_tiles) * self.tile.rows // self.per_block)
                _xattn_fixup_kernel[(n_units, qb1 - qb0)](
                    part, tile_max, row_stats[0], row_stats[1], out,
                    part.stride(0), part.stride(1), tile_max.stride(0), tile_max.stride(1), row_stats.stride(1),
                    out.stride(0), out.stride(1), unit0, qb0,
                    PER_BLOCK=self.per_block, KB_PER_TILE=self.tile.cols // self.per_block, BLOCK_KB=64,
                )


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
