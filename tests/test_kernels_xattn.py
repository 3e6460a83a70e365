"""XAttention kernels against their float64 references (Triton interpreter on CPU, compiled on GPU): antidiagonal
block scoring, block selection and its invariants, and block-sparse attention over block lists."""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from flux_kernels.interpret import use_interpreter_without_cuda

use_interpreter_without_cuda()

from flux_kernels.block_select import block_density, block_layout, block_lists, select_blocks
from flux_kernels.block_sparse_prefill import block_sparse_attention
from flux_kernels.reference import (
    block_sparse_attention_reference,
    left_padding_valid,
    xattn_block_scores_reference,
    xattn_select_reference,
)
from flux_kernels import xattn_scores
from flux_kernels.xattn_scores import SCORE_TILES, ScoreTiles, xattn_block_scores, xattn_block_scores_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def peaked_qkv(batch, heads, kv_heads, length, dim, block, hot_blocks, seed=0, strength=3.0):
    """Random q/k/v plus one shared direction in every query and in the keys of `hot_blocks`, so attention
    concentrates on those blocks and a threshold keeps few of the others (plain random inputs keep almost all)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, dim, generator=g)
    k = torch.randn(batch, kv_heads, length, dim, generator=g)
    v = torch.randn(batch, kv_heads, length, dim, generator=g)
    u = torch.randn(dim, generator=g)
    u = u / u.norm() * strength * math.sqrt(math.sqrt(dim))
    q = q + u
    for hb in hot_blocks:
        k[:, :, hb * block:(hb + 1) * block] += u
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


# batch, H, Hkv, T, D, block, stride, pads
SHAPES = [
    (2, 4, 2, 77, 16, 16, 4, [0, 21]),     # GQA 2:1, odd length, left padding not on a block boundary
    (2, 3, 1, 50, 32, 16, 2, [3, 20]),     # GQA 3:1, both samples padded
    (1, 2, 2, 64, 16, 16, 1, None),        # stride 1: the exact block softmax mass
    (2, 2, 1, 100, 16, 32, 8, [0, 40]),    # bigger blocks, a whole padding block
    (1, 2, 1, 45, 16, 16, 16, [7]),        # stride = block
]


@pytest.mark.parametrize("batch,heads,kv_heads,length,dim,block,stride,pads", SHAPES)
def test_scores_match_reference(batch, heads, kv_heads, length, dim, block, stride, pads):
    q, k, _ = peaked_qkv(batch, heads, kv_heads, length, dim, block, [1], seed=length)
    pad = None if pads is None else torch.tensor(pads, device=DEVICE)
    ref = xattn_block_scores_reference(q, k, pad, block, stride, 0.3)
    triton_scores = xattn_block_scores(q, k, block, stride, pad, 0.3)
    valid = None if pad is None else left_padding_valid(pad, batch, length, DEVICE)
    torch_scores = xattn_block_scores_torch(q, k, valid, block, stride, 0.3, max_elements=300)  # several chunks
    torch.testing.assert_close(triton_scores.double(), ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(torch_scores.double(), ref, atol=2e-6, rtol=1e-5)
    # each real query block's row holds one unit of mass per real strided row; above the diagonal nothing
    n_blocks = ref.shape[-1]
    assert bool((ref.triu(1) == 0).all())
    pads_list = [0] * batch if pads is None else pads
    for b in range(batch):
        idx = torch.arange(n_blocks * block)
        real = ((idx >= pads_list[b]) & (idx < length)).view(-1, stride).any(-1)
        per_block = real.view(n_blocks, block // stride).sum(-1).double()
        torch.testing.assert_close(ref[b].sum(-1), per_block.expand(heads, -1).to(ref.device))


# batch, H, Hkv, T, D, block, stride, pads: stride 1 and 2 give enough strided rows (290, 150) that even the
# 128 x 256 tilings walk several row and column tiles (the online max rescales across tiles)
TILING_SHAPES = [
    (2, 4, 2, 301, 32, 32, 4, [0, 45]),    # GQA 2:1, odd length, padding inside a block and a stride group
    (2, 3, 1, 290, 16, 16, 1, [0, 37]),    # GQA 3:1, stride 1
    (1, 2, 1, 300, 16, 32, 2, [5]),        # batch 1, padded
]


# the stride-1 shape is there for the big tilings; the 16 x 16 one already walks 5 x 5 tiles at stride 4
TILING_CASES = [pytest.param(tiles, shape, id=f"{tiles}-{sid}") for tiles in sorted(SCORE_TILES)
                for sid, shape in zip(("stride4", "stride1", "stride2"), TILING_SHAPES)
                if not (sid == "stride1" and SCORE_TILES[tiles].rows < 64)]


@pytest.mark.parametrize("passes", [1, 2])
@pytest.mark.parametrize("tiles,shape", TILING_CASES)
def test_every_tiling_matches_reference(tiles, passes, shape):
    """Each named tiling, in the one-pass (scratch + fix-up) and two-pass kernels, against the float64 reference
    and the torch fallback."""
    batch, heads, kv_heads, length, dim, block, stride, pads = shape
    q, k, _ = peaked_qkv(batch, heads, kv_heads, length, dim, block, [2], seed=length + stride)
    pad = torch.tensor(pads, device=DEVICE)
    ref = xattn_block_scores_reference(q, k, pad, block, stride, 0.3)
    got = xattn_block_scores(q, k, block, stride, pad, 0.3, tiles=tiles, passes=passes)
    torch.testing.assert_close(got.double(), ref, atol=2e-6, rtol=1e-5)
    valid = left_padding_valid(pad, batch, length, DEVICE)
    torch.testing.assert_close(got, xattn_block_scores_torch(q, k, valid, block, stride, 0.3), atol=2e-6, rtol=1e-5)


class _LaunchRecorder:
    """Stands in for a Triton kernel object: records each launch grid and forwards the launch."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


# (max_scratch_bytes, launch grids (units, row tiles)) for shape (2, 4, 2, 301, 32, block 32, stride 4) on the
# 16 x 16 tiling: 8 units, 76 strided rows = 5 row tiles, 10 key blocks, 5 column tiles, so one row tile needs
# 16 * 4 * (10 + 5 + 2) = 1088 bytes and one unit 5440
SCRATCH_PLANS = [
    (None, [(8, 5)]),                                  # the default bound holds every unit at once
    (3 * 5440 + 100, [(3, 5), (3, 5), (2, 5)]),        # units in groups of 3, the last one short
    (2 * 1088 + 10, [(1, 2), (1, 2), (1, 1)] * 8),     # one unit at a time, its row tiles in ranges of 2
    (1088, [(1, 1)] * 40),                             # exactly one row tile per launch
]


@pytest.mark.parametrize("max_scratch,grids", SCRATCH_PLANS)
def test_scratch_bound_groups_units_and_row_ranges(monkeypatch, max_scratch, grids):
    """A scratch bound smaller than the whole problem splits the one-pass launches into unit groups, then row
    ranges of one unit; the scores stay those of the reference."""
    batch, heads, kv_heads, length, dim, block, stride, pads = TILING_SHAPES[0]
    q, k, _ = peaked_qkv(batch, heads, kv_heads, length, dim, block, [1], seed=11)
    pad = torch.tensor(pads, device=DEVICE)
    recorder = _LaunchRecorder(xattn_scores._xattn_partials_kernel)
    monkeypatch.setattr(xattn_scores, "_xattn_partials_kernel", recorder)
    kwargs = {} if max_scratch is None else {"max_scratch_bytes": max_scratch}
    got = xattn_block_scores(q, k, block, stride, pad, 0.3, tiles="r16c16d128w4s1", **kwargs)
    assert recorder.grids == grids
    torch.testing.assert_close(got.double(), xattn_block_scores_reference(q, k, pad, block, stride, 0.3),
                               atol=2e-6, rtol=1e-5)


def test_tiles_smaller_than_a_block_grow_to_it():
    """block 128 at stride 2 puts 64 strided rows in a block: a 16 x 16 tiling is raised to whole blocks."""
    q, k, _ = peaked_qkv(1, 2, 1, 200, 16, 128, [0], seed=12)
    tiles = ScoreTiles(16, 16, 16, 4, 1)
    assert tiles.fitted(64, 16) == ScoreTiles(64, 64, 16, 4, 1)
    torch.testing.assert_close(xattn_block_scores(q, k, 128, 2, None, 0.3, tiles=tiles).double(),
                               xattn_block_scores_reference(q, k, None, 128, 2, 0.3), atol=2e-6, rtol=1e-5)


def test_scores_strided_inputs():
    """q as a transposed view of [B, T, H, D] (what HF hands the attention function)."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 40, 4, 16, generator=g).to(DEVICE).transpose(1, 2)
    k = torch.randn(2, 40, 2, 16, generator=g).to(DEVICE).transpose(1, 2)
    pad = torch.tensor([0, 9], device=DEVICE)
    torch.testing.assert_close(xattn_block_scores(q, k, 16, 4, pad, 0.25).double(),
                               xattn_block_scores_reference(q, k, pad, 16, 4, 0.25), atol=2e-6, rtol=1e-5)


def _check_invariants(keep, scores, pads, block, length, threshold):
    """Sink and diagonal kept, nothing non-causal or before the sink block, mass >= threshold, and minimal: dropping
    the lightest non-forced kept block falls below the threshold."""
    batch, heads, n_blocks, _ = keep.shape
    for b in range(batch):
        first = pads[b] // block
        for qb in range(n_blocks):
            row_keep = keep[b, :, qb]
            if qb * block + block - 1 < pads[b] or qb * block >= length:
                assert not bool(row_keep.any())
                continue
            assert bool(row_keep[:, first].all()) and bool(row_keep[:, qb].all())
            assert not bool(row_keep[:, :first].any()) and not bool(row_keep[:, qb + 1:].any())
            for h in range(heads):
                s = scores[b, h, qb].double()
                total = float(s[first:qb + 1].sum())
                kept = [kb for kb in range(n_blocks) if row_keep[h, kb]]
                mass = float(s[kept].sum())
                assert mass >= threshold * total - 1e-9
                optional = [kb for kb in kept if kb not in (first, qb)]
                if optional:
                    lightest = min(optional, key=lambda kb: float(s[kb]))
                    assert mass - float(s[lightest]) < threshold * total


@pytest.mark.parametrize("threshold", [0.5, 0.8, 0.95])
def test_threshold_selection_invariants_and_reference(threshold):
    block, length = 16, 150
    q, k, _ = peaked_qkv(2, 4, 2, length, 16, block, [2, 5], seed=1)
    pads = [0, 35]
    pad = torch.tensor(pads, device=DEVICE)
    scores = xattn_block_scores(q, k, block, 4, pad, 0.25)
    valid = left_padding_valid(pad, 2, length, DEVICE)
    keep = select_blocks(scores, valid, block, length, threshold=threshold)
    assert torch.equal(keep.cpu(), xattn_select_reference(scores, pad, block, length, threshold=threshold).cpu())
    _check_invariants(keep.cpu(), scores.cpu(), pads, block, length, threshold)
    if threshold < 0.9:  # peaked inputs: a threshold below 1 really drops blocks
        assert block_density(keep, valid, block, length) < 0.8


@pytest.mark.parametrize("density", [0.1, 0.5, 1.0])
def test_fixed_density_keeps_the_top_blocks(density):
    block, length = 16, 160
    q, k, _ = peaked_qkv(1, 2, 1, length, 16, block, [3], seed=2)
    scores = xattn_block_scores(q, k, block, 4, None, 0.25)
    keep = select_blocks(scores, None, block, length, density=density)
    assert torch.equal(keep.cpu(), xattn_select_reference(scores, None, block, length, density=density).cpu())
    candidates, forced, _ = block_layout(None, 1, length, block, keep.device)
    n_cand = candidates.sum(-1).expand(1, 2, -1)
    want = torch.clamp(torch.ceil(density * n_cand - 1e-6), min=forced.sum(-1), max=n_cand)
    assert torch.equal(keep.sum(-1), want.long())
    assert bool(keep[forced.expand_as(keep)].all())
    for h in range(2):  # every kept optional block scores at least as high as every dropped candidate
        for qb in range(keep.shape[2]):
            row = scores[0, h, qb]
            optional = candidates[0, 0, qb] & ~forced[0, 0, qb]
            kept, dropped = row[optional & keep[0, h, qb]], row[optional & ~keep[0, h, qb]]
            if kept.numel() and dropped.numel():
                assert float(kept.min()) >= float(dropped.max())


def test_block_lists_are_ascending_and_counted():
    keep = torch.tensor([[[[True, False, False], [True, True, False], [True, False, True]]]])
    blocks, counts = block_lists(keep)
    assert counts.tolist() == [[[1, 2, 2]]]
    assert [blocks[0, 0, i, :int(counts[0, 0, i])].tolist() for i in range(3)] == [[0], [0, 1], [0, 2]]


@pytest.mark.parametrize("batch,heads,kv_heads,length,dim,block,stride,pads", SHAPES[:2] + SHAPES[3:])
def test_block_sparse_attention_matches_reference(batch, heads, kv_heads, length, dim, block, stride, pads):
    q, k, v = peaked_qkv(batch, heads, kv_heads, length, dim, block, [1, 3], seed=length + 1)
    pad = None if pads is None else torch.tensor(pads, device=DEVICE)
    valid = None if pad is None else left_padding_valid(pad, batch, length, DEVICE)
    keep = select_blocks(xattn_block_scores(q, k, block, stride, pad, 0.3), valid, block, length, threshold=0.7)
    blocks, counts = block_lists(keep)
    out = block_sparse_attention(q, k, v, blocks, counts, block, pad, scale=0.3)
    ref = block_sparse_attention_reference(q, k, v, keep, block, pad, scale=0.3)
    assert out.shape == (batch, heads, length, dim) and out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for b, p in enumerate(pads or []):
        assert not bool(out[b, :, :p].any())  # padding rows are zeros


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (32, 16)])
def test_block_sparse_attention_tiling_overrides_match_reference(block_m, block_n):
    """The tiling knobs the GPU bench sweeps (rows per program, keys per step, warps, stages) change nothing but
    speed: a padded GQA batch against the reference."""
    batch, heads, kv_heads, length, dim, block, stride, pads = SHAPES[3]  # block 32: both tilings differ
    q, k, v = peaked_qkv(batch, heads, kv_heads, length, dim, block, [1, 3], seed=length + 2)
    pad = None if pads is None else torch.tensor(pads, device=DEVICE)
    valid = None if pad is None else left_padding_valid(pad, batch, length, DEVICE)
    keep = select_blocks(xattn_block_scores(q, k, block, stride, pad, 0.3), valid, block, length, threshold=0.7)
    blocks, counts = block_lists(keep)
    out = block_sparse_attention(q, k, v, blocks, counts, block, pad, scale=0.3, block_m=min(block_m, block),
                                 block_n=min(block_n, block), num_warps=2, num_stages=1)
    ref = block_sparse_attention_reference(q, k, v, keep, block, pad, scale=0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_block_sparse_skips_blocks_not_listed():
    """Every row keeps only its sink and diagonal blocks; the keys of blocks 1..3 are poisoned with NaN. Rows of
    blocks 4 and 5 never list them, so finite exact outputs there prove unlisted blocks are never loaded."""
    block, length = 16, 96
    q, k, v = peaked_qkv(1, 2, 1, length, 16, block, [], seed=3)
    keep = torch.zeros(1, 2, 6, 6, dtype=torch.bool, device=DEVICE)
    for qb in range(6):
        keep[:, :, qb, 0] = keep[:, :, qb, qb] = True
    ref = block_sparse_attention_reference(q, k, v, keep, block)
    k[:, :, block:4 * block] = float("nan")
    v[:, :, block:4 * block] = float("nan")
    blocks, counts = block_lists(keep)
    out = block_sparse_attention(q, k, v, blocks, counts, block)[:, :, 4 * block:]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref[:, :, 4 * block:], atol=1e-5, rtol=1e-5)


def test_bad_arguments():
    q, k, v = peaked_qkv(1, 2, 1, 32, 16, 16, [], seed=4)
    with pytest.raises(ValueError, match="block_size=24 must be a power of two"):
        xattn_block_scores(q, k, 24, 4)
    with pytest.raises(ValueError, match="stride=3 must be >= 1 and divide block_size=16"):
        xattn_block_scores(q, k, 16, 3)
    with pytest.raises(ValueError, match="tiles='big' is not a known tiling; use one of r16c16d128w4s1"):
        xattn_block_scores(q, k, 16, 4, tiles="big")
    with pytest.raises(ValueError, match="tiles.cols=24 must be a power of two >= 16"):
        xattn_block_scores(q, k, 16, 4, tiles=ScoreTiles(16, 24, 16, 4, 1))
    with pytest.raises(ValueError, match="passes=3 must be 1"):
        xattn_block_scores(q, k, 16, 4, passes=3)
    with pytest.raises(ValueError, match="max_scratch_bytes=100 is below the 320 bytes one tile"):
        xattn_block_scores(q, k, 16, 4, max_scratch_bytes=100, tiles="r16c16d128w4s1")
    with pytest.raises(ValueError, match="threshold=1.5 must lie in"):
        select_blocks(torch.zeros(1, 2, 2, 2), None, 16, 32, threshold=1.5)
    with pytest.raises(ValueError, match="exactly one of threshold or density"):
        select_blocks(torch.zeros(1, 2, 2, 2), None, 16, 32, threshold=0.5, density=0.5)
    blocks, counts = block_lists(torch.ones(1, 2, 2, 2, dtype=torch.bool).tril())
    with pytest.raises(ValueError, match="kv_blocks must be int32"):
        block_sparse_attention(q, k, v, blocks.long(), counts, 16)
    with pytest.raises(ValueError, match="block_size=8 must be a power of two >= 16"):
        block_sparse_attention(q, k, v, blocks, counts, 8)


@pytest.mark.gpu
def test_gpu_real_shapes():
    """bf16, Qwen-like heads (28 q / 4 kv, head dim 128), block 128, stride 8, 8k tokens with padding: scores against
    the float64 reference on a slice of rows, attention against the reference for the same selection."""
    torch.manual_seed(0)
    b, h, hk, t, d = 2, 28, 4, 8192, 128
    q = torch.randn(b, h, t, d, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(b, hk, t, d, device=DEVICE, dtype=torch.bfloat16)
    v = torch.randn(b, hk, t, d, device=DEVICE, dtype=torch.bfloat16)
    pad = torch.tensor([0, 1000], device=DEVICE)
    scores = xattn_block_scores(q, k, 128, 8, pad)
    ref = xattn_block_scores_reference(q[:, :4], k[:, :1], pad, 128, 8)
    assert ((scores[:, :4].double() - ref).abs().max() / ref.abs().max()).item() < 2e-2
    valid = left_padding_valid(pad, b, t, DEVICE)
    keep = select_blocks(scores, valid, 128, t, density=0.1)
    blocks, counts = block_lists(keep)
    out = block_sparse_attention(q, k, v, blocks, counts, 128, pad)
    lo, hi = t - 512, t
    want = block_sparse_attention_reference(q[:, :2], k[:, :1], v[:, :1], keep[:, :2], 128, pad)[:, :, lo:hi]
    err = (out[:, :2, lo:hi].double() - want.double()).norm() / want.double().norm()
    assert err.item() < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("tiles", [name for name, t in SCORE_TILES.items() if t.rows >= 64])
def test_gpu_tilings_agree(tiles):
    """bf16 Qwen-like heads at 8k with padding: every GPU tiling, one pass and two, against the float64 reference
    on a slice of heads (compiled kernels: the interpreter does not check shared memory or register limits)."""
    torch.manual_seed(1)
    b, h, hk, t, d = 2, 28, 4, 8192, 128
    q = torch.randn(b, h, t, d, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(b, hk, t, d, device=DEVICE, dtype=torch.bfloat16)
    pad = torch.tensor([0, 777], device=DEVICE)
    ref = xattn_block_scores_reference(q[:, :7], k[:, :1], pad, 128, 8)
    for passes in (1, 2):
        got = xattn_block_scores(q, k, 128, 8, pad, tiles=tiles, passes=passes)[:, :7].double()
        assert ((got - ref).abs().max() / ref.abs().max()).item() < 2e-2
