"""Split-KV decode kernel vs the float64 reference (Triton interpreter on CPU, compiled on GPU)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from flux_kernels.interpret import use_interpreter_without_cuda

use_interpreter_without_cuda()

from flux_kernels.decode import decode_attention, plan_decode
from flux_kernels.reference import decode_attention_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _cache(batch, heads, kv_heads, capacity, dim, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, 1, dim, generator=g).to(DEVICE, dtype)
    k = torch.randn(batch, kv_heads, capacity, dim, generator=g).to(DEVICE, dtype)
    v = torch.randn(batch, kv_heads, capacity, dim, generator=g).to(DEVICE, dtype)
    return q, k, v


def _t(values):
    return None if values is None else torch.tensor(values, device=DEVICE)


@pytest.mark.parametrize("batch,heads,kv_heads,capacity,dim,start,end,chunk", [
    (2, 4, 1, 70, 64, [0, 9], [70, 50], None),     # GQA 4:1, left-padded full cache, partly filled
    (2, 6, 2, 45, 64, [3, 0], [45, 17], 32),       # GQA 3:1, several splits
    (2, 3, 1, 100, 64, None, [1, 100], 32),        # one sample sees a single slot
    (1, 4, 4, 40, 128, None, None, None),          # MHA, head_dim 128, whole cache
])
def test_ranges_match_reference(batch, heads, kv_heads, capacity, dim, start, end, chunk):
    q, k, v = _cache(batch, heads, kv_heads, capacity, dim)
    plan = plan_decode(batch, kv_heads, capacity, q.device, q.dtype, chunk=chunk)
    out = decode_attention(q, k, v, _t(start), _t(end), plan=plan)
    ref = decode_attention_reference(q, k, v, _t(start), _t(end))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 5])
def test_positions_mode_matches_reference(window):
    """Slots in any order with per-slot positions (-1 = empty), as a ring-buffer cache stores them."""
    q, k, v = _cache(2, 4, 2, 40, 64, seed=1)
    g = torch.Generator().manual_seed(7)
    kv_pos = torch.randint(-1, 30, (2, 40), generator=g).to(DEVICE)
    q_pos = _t([25, 12])
    plan = plan_decode(2, 2, 40, q.device, q.dtype, chunk=32)
    out = decode_attention(q, k, v, sink=2, window=window, kv_pos=kv_pos, q_pos=q_pos, plan=plan)
    ref = decode_attention_reference(q, k, v, sink=2, window=window, kv_pos=kv_pos, q_pos=q_pos)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_window_on_untrimmed_cache_skips_invisible_slots():
    """A streaming layer reading a full cache: slots between the sinks and the window are poisoned with NaN, so a
    finite exact result shows they are never loaded."""
    sink, window, capacity = 2, 6, 64
    q, k, v = _cache(2, 4, 1, capacity, 64, seed=2)
    start, end = _t([0, 5]), _t([60, 64])
    ref = decode_attention_reference(q, k, v, start, end, sink=sink, window=window)
    k[0, :, sink:60 - window] = float("nan")
    v[0, :, sink:60 - window] = float("nan")
    k[1, :, 5 + sink:64 - window] = float("nan")
    v[1, :, 5 + sink:64 - window] = float("nan")
    plan = plan_decode(2, 1, capacity, q.device, q.dtype, chunk=32)
    out = decode_attention(q, k, v, start, end, sink=sink, window=window, plan=plan)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_merge_over_many_splits():
    """70 splits: the reduce kernel walks them in several tiles of 32; the last split is partly filled."""
    q, k, v = _cache(1, 2, 1, 70 * 32, 16, seed=6)
    plan = plan_decode(1, 1, 70 * 32, q.device, q.dtype, chunk=32)
    assert plan.num_splits == 70
    end = _t([70 * 32 - 5])
    out = decode_attention(q, k, v, None, end, plan=plan)
    torch.testing.assert_close(out, decode_attention_reference(q, k, v, None, end), atol=1e-5, rtol=1e-5)


def test_sample_without_keys_returns_zeros():
    q, k, v = _cache(2, 4, 1, 30, 64, seed=3)
    out = decode_attention(q, k, v, _t([0, 10]), _t([30, 10]))
    assert torch.isfinite(out).all()
    assert out[1].abs().max() == 0
    assert out[0].abs().max() > 0


# Triton 3.9's CPU interpreter multiplies bf16 dot operands as raw uint16 bits, so bf16 is checked on GPU only.
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=pytest.mark.gpu), torch.float16])
def test_half_precision_inputs(dtype):
    q, k, v = _cache(2, 4, 1, 50, 64, dtype=dtype, seed=4)
    out = decode_attention(q, k, v, _t([0, 3]), _t([50, 41]))
    ref = decode_attention_reference(q, k, v, _t([0, 3]), _t([50, 41]))
    assert out.dtype == dtype
    assert (out.double() - ref.double()).norm() / ref.double().norm() < 2e-2


def test_plan_is_static_in_capacity():
    """Split count depends on capacity only, so a captured graph stays valid as kv_end grows."""
    a = plan_decode(1, 4, 4096, torch.device("cpu"), torch.bfloat16)
    b = plan_decode(1, 4, 4096, torch.device("cpu"), torch.bfloat16)
    assert a == b
    assert a.num_splits * a.chunk >= 4096
    with pytest.raises(ValueError, match="chunk=40"):
        plan_decode(1, 4, 4096, torch.device("cpu"), torch.bfloat16, chunk=40)


def test_bad_arguments():
    q, k, v = _cache(2, 4, 1, 10, 64)
    with pytest.raises(ValueError, match="one query token"):
        decode_attention(q.expand(2, 4, 2, 64), k, v)
    with pytest.raises(ValueError, match="kv_pos and q_pos go together"):
        decode_attention(q, k, v, kv_pos=torch.zeros(2, 10, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="kv_end must be an integer"):
        decode_attention(q, k, v, kv_end=torch.ones(2, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("batch,capacity", [(1, 131072), (8, 32768), (8, 2176)])
def test_gpu_real_shapes(batch, capacity):
    q, k, v = _cache(batch, 28, 4, capacity, 128, dtype=torch.bfloat16, seed=5)
    end = torch.full((batch,), capacity - 7, device=DEVICE)
    start = torch.arange(batch, device=DEVICE) * 3
    out = decode_attention(q, k, v, start, end)
    ref = decode_attention_reference(q, k, v, start, end)
    assert (out.double() - ref.double()).norm() / ref.double().norm() < 1e-2


def test_two_caches_each_row_reads_its_own():
    """Rows 0 and 2 read the full cache (rows 1 and 0 of it), row 1 the ring cache (its only row): the same as
    three separate calls, one per row."""
    q, _, _ = _cache(3, 4, 2, 1, 64, seed=8)
    _, fk, fv = _cache(2, 4, 2, 90, 64, seed=9)
    _, rk, rv = _cache(1, 4, 2, 20, 64, seed=10)
    row_ring, row_local = _t([0, 1, 0]), _t([1, 0, 0])
    end, ring_end = _t([77, 0, 90]), _t([0, 13, 0])
    plan = plan_decode(3, 2, 90, q.device, q.dtype, chunk=32)
    out = decode_attention(q, fk, fv, None, end, plan=plan, ring=(rk, rv, row_ring, row_local, ring_end))
    want = torch.cat([decode_attention_reference(q[0:1], fk[1:2], fv[1:2], None, _t([77])),
                      decode_attention_reference(q[1:2], rk, rv, None, _t([13])),
                      decode_attention_reference(q[2:3], fk[0:1], fv[0:1], None, _t([90]))])
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
