"""Streaming prefill kernel vs the float64 reference (Triton interpreter on CPU, compiled on GPU)."""

from __future__ import annotations

import pytest
import torch
from kernel_inputs import DEVICE, random_qkv

_qkv = random_qkv  # kernel_inputs first: it switches the Triton interpreter on without CUDA

from flux_kernels.reference import streaming_attention_reference
from flux_kernels.streaming_prefill import streaming_attention_prefill

CASES = [
    # batch, H, Hkv, Tq, Tk, D, sink, window, pads
    (2, 4, 1, 37, 37, 64, 4, 9, [0, 5]),       # GQA 4:1, lengths not a block multiple, left padding
    (2, 6, 2, 50, 50, 64, 0, 13, [3, 0]),      # GQA 3:1, no sink
    (1, 3, 1, 29, 29, 64, 3, 100, None),       # window larger than the sequence
    (2, 4, 1, 20, 45, 64, 2, 7, [0, 11]),      # queries are the last Tq of Tk keys
    (2, 4, 2, 33, 33, 64, 5, None, [2, 30]),   # window=None: plain causal; one sample mostly padding
]


@pytest.mark.parametrize("batch,heads,kv_heads,q_len,kv_len,dim,sink,window,pads", CASES)
def test_matches_float64_reference(batch, heads, kv_heads, q_len, kv_len, dim, sink, window, pads):
    q, k, v = _qkv(batch, heads, kv_heads, q_len, kv_len, dim)
    pad = None if pads is None else torch.tensor(pads, device=DEVICE)
    out = streaming_attention_prefill(q, k, v, sink, window, pad, block_m=16, block_n=16)
    ref = streaming_attention_reference(q, k, v, pad, sink, window)
    assert out.shape == (batch, heads, q_len, dim)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


DENSE_LAST_CASES = [
    # batch, H, Hkv, Tq, Tk, D, sink, window, pads, dense_last
    (2, 4, 2, 37, 37, 32, 3, 7, [0, 5], 6),      # dense rows inside the last block
    (2, 4, 1, 50, 50, 16, 0, 5, [3, 20], 40),    # dense rows span blocks; sample 1 has fewer real rows than that
    (2, 4, 2, 20, 45, 16, 2, 7, [0, 11], 9),     # queries are the last Tq of Tk keys
    (1, 2, 2, 33, 33, 16, 2, 4, None, 100),      # every row dense: plain causal
    (2, 4, 2, 29, 29, 16, 1, 5, [0, 20], 17),    # sample 1 has 9 real tokens: its padding rows in the band are zeros
    (2, 2, 1, 31, 31, 16, 2, 6, [4, 0], 1),      # only the last row dense
]


@pytest.mark.parametrize("batch,heads,kv_heads,q_len,kv_len,dim,sink,window,pads,dense_last", DENSE_LAST_CASES)
def test_dense_last_rows_match_reference(batch, heads, kv_heads, q_len, kv_len, dim, sink, window, pads, dense_last):
    q, k, v = _qkv(batch, heads, kv_heads, q_len, kv_len, dim, seed=dense_last)
    pad = None if pads is None else torch.tensor(pads, device=DEVICE)
    out = streaming_attention_prefill(q, k, v, sink, window, pad, block_m=16, block_n=16, dense_last=dense_last)
    ref = streaming_attention_reference(q, k, v, pad, sink, window, dense_last=dense_last)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if dense_last < q_len:  # rows before the dense band are still sink + window
        plain = streaming_attention_reference(q, k, v, pad, sink, window)
        torch.testing.assert_close(out[:, :, :q_len - dense_last], plain[:, :, :q_len - dense_last], atol=1e-5,
                                   rtol=1e-5)


def test_padding_rows_are_zero_and_finite():
    q, k, v = _qkv(2, 4, 1, 24, 24, 64)
    pad = torch.tensor([7, 0], device=DEVICE)
    out = streaming_attention_prefill(q, k, v, 2, 5, pad, block_m=16, block_n=16)
    assert torch.isfinite(out).all()
    assert out[0, :, :7].abs().max() == 0
    assert out[1, :, 0].abs().max() > 0


def test_output_memory_is_token_major():
    """[B, H, T, D] view over [B, T, H, D] memory: the o_proj reshape after transpose(1, 2) needs no copy."""
    q, k, v = _qkv(1, 4, 2, 20, 20, 64)
    out = streaming_attention_prefill(q, k, v, 1, 4, block_m=16, block_n=16)
    assert out.transpose(1, 2).is_contiguous()


def test_strided_inputs_and_custom_scale():
    """HF hands q as a transposed view of [B, T, H, D]; strides must be honoured, and an explicit scale used."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 21, 3, 64, generator=g).to(DEVICE).transpose(1, 2)
    k = torch.randn(2, 21, 1, 64, generator=g).to(DEVICE).transpose(1, 2)
    v = torch.randn(2, 21, 1, 64, generator=g).to(DEVICE).transpose(1, 2)
    pad = torch.tensor([0, 4], device=DEVICE)
    out = streaming_attention_prefill(q, k, v, 3, 6, pad, scale=0.05, block_m=16, block_n=16)
    ref = streaming_attention_reference(q, k, v, pad, 3, 6, scale=0.05)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_skips_keys_outside_sink_and_window():
    """Keys no query can see are poisoned with NaN: any load of them would leak NaN through p @ V, so a finite,
    exact output proves the kernel only visits the sink and window ranges (the O(T * (sink + window)) claim)."""
    sink, window, q_len, kv_len = 3, 8, 16, 64
    q, k, v = _qkv(1, 4, 1, q_len, kv_len, 64)
    ref = streaming_attention_reference(q, k, v, None, sink, window)
    first_query = kv_len - q_len
    k[:, :, sink:first_query - window + 1] = float("nan")
    v[:, :, sink:first_query - window + 1] = float("nan")
    out = streaming_attention_prefill(q, k, v, sink, window, block_m=16, block_n=16)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# Triton 3.9's CPU interpreter multiplies bf16 dot operands as raw uint16 bits, so bf16 is checked on GPU only.
HALF_CASES = [pytest.param(torch.bfloat16, 2e-2, marks=pytest.mark.gpu), (torch.float16, 5e-3)]


@pytest.mark.parametrize("dtype,tol", HALF_CASES)
def test_half_precision_inputs(dtype, tol):
    q, k, v = _qkv(2, 4, 1, 40, 40, 64, dtype=dtype, seed=1)
    pad = torch.tensor([0, 9], device=DEVICE)
    out = streaming_attention_prefill(q, k, v, 2, 11, pad, block_m=16, block_n=16)
    ref = streaming_attention_reference(q, k, v, pad, 2, 11)
    assert out.dtype == dtype
    err = (out.double() - ref.double()).norm() / ref.double().norm()
    assert err < tol


@pytest.mark.parametrize("kwargs,match", [
    ({"window": 0}, "window=0"),
    ({"sink": -1}, "sink=-1"),
    ({"dense_last": -2}, "dense_last=-2"),
])
def test_bad_pattern_arguments(kwargs, match):
    q, k, v = _qkv(1, 4, 1, 8, 8, 64)
    args = {"sink": 1, "window": 4, "dense_last": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        streaming_attention_prefill(q, k, v, args["sink"], args["window"], dense_last=args["dense_last"])


def test_bad_shapes():
    q, k, v = _qkv(1, 4, 3, 8, 8, 64)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        streaming_attention_prefill(q, k, v, 1, 4)
    q, k, v = _qkv(1, 4, 1, 8, 8, 48)
    with pytest.raises(ValueError, match="head_dim=48"):
        streaming_attention_prefill(q, k, v, 1, 4)
    q, k, v = _qkv(1, 4, 1, 9, 8, 64)
    with pytest.raises(ValueError, match="q_len=9 exceeds kv_len=8"):
        streaming_attention_prefill(q, k, v, 1, 4)
    q, k, v = _qkv(2, 4, 1, 8, 8, 64)
    with pytest.raises(ValueError, match="kv_pad must have shape"):
        streaming_attention_prefill(q, k, v, 1, 4, torch.tensor([1], device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [64, 128])
def test_gpu_real_shapes(dim):
    """Hopper tile sizes, long sequence, bf16: relative error of the sliced rows against float64."""
    t = 5000
    q, k, v = _qkv(2, 28 if dim == 128 else 8, 4 if dim == 128 else 2, t, t, dim, dtype=torch.bfloat16, seed=2)
    pad = torch.tensor([0, 333], device=DEVICE)
    out = streaming_attention_prefill(q, k, v, 128, 1024, pad)
    for lo in (0, 2400, t - 200):
        hi = lo + 200
        ref = streaming_attention_reference(q[:, :, lo:hi], k[:, :, :hi], v[:, :, :hi], pad, 128, 1024)
        err = (out[:, :, lo:hi].double() - ref.double()).norm() / ref.double().norm()
        assert err < 1e-2


@pytest.mark.gpu
def test_gpu_dense_last_real_shapes():
    """Triangle at Hopper tiles: the dense band (64 rows) and ordinary rows against float64, bf16, left padding."""
    t = 5000
    q, k, v = _qkv(2, 28, 4, t, t, 128, dtype=torch.bfloat16, seed=3)
    pad = torch.tensor([0, 333], device=DEVICE)
    out = streaming_attention_prefill(q, k, v, 128, 1024, pad, dense_last=64)
    for lo in (2400, t - 200):
        hi = lo + 200
        ref = streaming_attention_reference(q[:, :, lo:hi], k[:, :, :hi], v[:, :, :hi], pad, 128, 1024,
                                            dense_last=max(0, 64 - (t - hi)))
        err = (out[:, :, lo:hi].double() - ref.double()).norm() / ref.double().norm()
        assert err < 1e-2
