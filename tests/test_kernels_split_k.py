"""Split-K causal attention of the last queries (the triangle pattern's dense band) vs the float64 reference (Triton
interpreter on CPU, compiled on GPU), its launch shape, and the merge it shares with split-KV decode."""

from __future__ import annotations

import pytest
import torch
from kernel_inputs import DEVICE, random_qkv

_qkv = random_qkv  # kernel_inputs first: it switches the Triton interpreter on without CUDA

from flux_kernels.reference import streaming_attention_reference
from flux_kernels.split_k_prefill import split_k_attention, split_k_chunk


def _pad(pads):
    return None if pads is None else torch.tensor(pads, device=DEVICE)


CASES = [
    # batch, H, Hkv, Tq, Tk, D, pads, chunk (None = the default plan)
    (2, 4, 2, 17, 77, 16, [0, 13], 16),       # GQA 2:1, one key block per split, Tq spans two query tiles
    (3, 6, 2, 5, 50, 32, [4, 0, 47], 16),     # sample 2: 3 real tokens < Tq (padding rows), empty splits before it
    (1, 3, 3, 1, 41, 16, None, 32),           # one query, odd Tk, the last split partly filled
    (2, 4, 1, 37, 37, 64, [0, 9], None),      # Tq = Tk: the whole prompt causal, default plan
    (1, 2, 1, 3, 33, 128, None, 16),          # head_dim 128
]


@pytest.mark.parametrize("batch,heads,kv_heads,q_len,kv_len,dim,pads,chunk", CASES)
def test_matches_causal_reference(batch, heads, kv_heads, q_len, kv_len, dim, pads, chunk):
    q, k, v = _qkv(batch, heads, kv_heads, q_len, kv_len, dim, seed=q_len)
    pad = _pad(pads)
    out = split_k_attention(q, k, v, pad, 0.3, chunk=chunk, block_m=16, block_n=16)
    ref = streaming_attention_reference(q, k, v, pad, 0, None, 0.3)
    assert out.shape == (batch, heads, q_len, dim) and out.dtype == q.dtype
    assert out.transpose(1, 2).is_contiguous()  # [B, Tq, H, D] memory like the prefill kernels' outputs
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for b, p in enumerate(pads or []):
        first_real = p - (kv_len - q_len)  # query rows before it are padding
        if first_real > 0:
            assert not bool(out[b, :, :first_real].any())


def test_padding_keys_are_never_loaded():
    """Keys in the left padding are poisoned with NaN: a load of any of them would leak NaN through p @ V."""
    q, k, v = _qkv(2, 4, 2, 6, 60, 16, seed=4)
    pad = _pad([0, 37])
    ref = streaming_attention_reference(q, k, v, pad, 0, None)
    k[1, :, :37] = float("nan")
    v[1, :, :37] = float("nan")
    out = split_k_attention(q, k, v, pad, chunk=16, block_m=16, block_n=16)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_writes_only_into_the_given_out_rows():
    """The streaming prefill hands the last rows of its own output: those rows are written, nothing else."""
    q, k, v = _qkv(2, 4, 2, 30, 30, 16, seed=5)
    full = torch.full((2, 30, 4, 16), 7.0, device=DEVICE).transpose(1, 2)
    got = split_k_attention(q[:, :, 21:], k, v, _pad([0, 3]), out=full[:, :, 21:], chunk=16, block_n=16)
    ref = streaming_attention_reference(q, k, v, _pad([0, 3]), 0, None)
    assert got.data_ptr() == full[:, :, 21:].data_ptr()
    torch.testing.assert_close(full[:, :, 21:], ref[:, :, 21:], atol=1e-5, rtol=1e-5)
    assert bool((full[:, :, :21] == 7.0).all())


# Triton 3.9's CPU interpreter multiplies bf16 dot operands as raw uint16 bits, so bf16 is checked on GPU only.
@pytest.mark.parametrize("dtype,tol", [pytest.param(torch.bfloat16, 2e-2, marks=pytest.mark.gpu),
                                       (torch.float16, 5e-3)])
def test_half_precision_inputs(dtype, tol):
    q, k, v = _qkv(2, 4, 1, 9, 40, 64, dtype=dtype, seed=1)
    pad = _pad([0, 11])
    out = split_k_attention(q, k, v, pad, chunk=16, block_m=16, block_n=16)
    ref = streaming_attention_reference(q, k, v, pad, 0, None)
    assert out.dtype == dtype
    err = (out.double() - ref.double()).norm() / ref.double().norm()
    assert err < tol


def test_launch_shape_fills_the_gpu_and_is_static():
    """H200 (132 SMs), Qwen2.5-7B band (28 heads, one 64-query tile): ~8 programs per SM at 128k, whole key blocks;
    short prompts keep at least 4 key blocks per split."""
    chunk = split_k_chunk(1, 28, 1, 131072, 64, 132)
    splits = -(-131072 // chunk)
    assert chunk % 64 == 0
    assert 7 * 132 <= 28 * splits <= 9 * 132
    assert split_k_chunk(1, 28, 1, 1000, 64, 132) == 4 * 64
    assert split_k_chunk(8, 28, 1, 131072, 64, 132) > chunk  # more rows, fewer splits


def test_bad_arguments():
    q, k, v = _qkv(1, 4, 1, 8, 20, 16)
    with pytest.raises(ValueError, match="chunk=24 must be a positive multiple of block_n=16"):
        split_k_attention(q, k, v, chunk=24, block_n=16)
    with pytest.raises(ValueError, match="out must match q"):
        split_k_attention(q, k, v, out=torch.empty(1, 4, 9, 16, device=DEVICE))
    with pytest.raises(ValueError, match="q_len=8 exceeds kv_len=5"):
        split_k_attention(q, k[:, :, :5], v[:, :, :5])


@pytest.mark.gpu
def test_gpu_real_shapes():
    """Hopper tiles and the default plan, bf16, Qwen2.5-7B heads, a 64-query band over 5000 keys, left padding."""
    q, k, v = _qkv(2, 28, 4, 64, 5000, 128, dtype=torch.bfloat16, seed=2)
    pad = _pad([0, 333])
    out = split_k_attention(q, k, v, pad)
    ref = streaming_attention_reference(q, k, v, pad, 0, None)
    err = (out.double() - ref.double()).norm() / ref.double().norm()
    assert err < 1e-2
