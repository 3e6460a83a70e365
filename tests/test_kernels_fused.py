"""Fused decode-step ops vs the transformers modules they replace (fp32 on CPU via the interpreter; bf16 on GPU)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from flux_kernels.interpret import use_interpreter_without_cuda

use_interpreter_without_cuda()

from flux_kernels.fused_ops import add_rms_norm, qkv_rope_store, silu_mul
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter rounds fp32 -> bf16 by truncation, unlike the GPU, so bf16 bit-equality is a GPU test.
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


def _randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_matches_hf_block(dtype):
    norm = LlamaRMSNorm(100, eps=1e-5).to(DEVICE, dtype)
    norm.weight.data = _randn(100, dtype=dtype, seed=1)
    x, res = _randn(3, 2, 100, dtype=dtype, seed=2), _randn(3, 2, 100, dtype=dtype, seed=3)
    y, new_res = add_rms_norm(x, norm.weight, norm.variance_epsilon, res)
    summed = res + x
    torch.testing.assert_close(new_res, summed, atol=0, rtol=0)
    torch.testing.assert_close(y, norm(summed), atol=1e-6, rtol=1e-6)
    y0, same = add_rms_norm(x, norm.weight, norm.variance_epsilon)
    torch.testing.assert_close(y0, norm(x), atol=1e-6, rtol=1e-6)
    assert same is x or torch.equal(same, x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_qkv_rope_store_matches_hf_rotary(dtype):
    b, t, nq, nkv, d, cap = 2, 5, 3, 1, 16, 20
    qkv = _randn(b, t, (nq + 2 * nkv) * d, dtype=dtype, seed=4)
    pos = torch.arange(t, device=DEVICE)[None].repeat(b, 1) + torch.tensor([[0], [3]], device=DEVICE)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=DEVICE).float() / d))
    freqs = pos[..., None].float() * inv
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    q_out = torch.empty(b, t, nq, d, device=DEVICE, dtype=dtype).transpose(1, 2)
    k_cache = torch.zeros(b, nkv, cap, d, device=DEVICE, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    slot = torch.tensor([2, 7], device=DEVICE, dtype=torch.int32)
    qkv_rope_store(qkv, cos, sin, nq, nkv, q_out, k_cache, v_cache, slot)

    q, k, v = qkv.split([nq * d, nkv * d, nkv * d], dim=-1)
    q = q.view(b, t, nq, d).transpose(1, 2)
    k = k.view(b, t, nkv, d).transpose(1, 2)
    v = v.view(b, t, nkv, d).transpose(1, 2)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    # Same rounding points as HF; on GPU bf16 still differs by at most one bf16 ulp on some elements.
    tol = 1e-6 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(q_out, q_ref, atol=tol, rtol=tol)
    for i, s in enumerate((2, 7)):
        torch.testing.assert_close(k_cache[i, :, s:s + t], k_ref[i], atol=tol, rtol=tol)
        torch.testing.assert_close(v_cache[i, :, s:s + t], v[i], atol=0, rtol=0)
    untouched = torch.ones(cap, dtype=torch.bool)
    untouched[2:2 + t] = False
    assert k_cache[0, :, untouched].abs().max() == 0


def test_qkv_rope_store_rejects_bad_widths():
    qkv = _randn(1, 2, 70)
    cos = _randn(1, 2, 16)
    buf = torch.empty(1, 3, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="qkv width 70"):
        qkv_rope_store(qkv, cos, cos, 3, 1, buf, buf, buf)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_torch(dtype):
    gate_up = _randn(3, 2, 200, dtype=dtype, seed=5)
    ref = torch.nn.functional.silu(gate_up[..., :100]) * gate_up[..., 100:]
    torch.testing.assert_close(silu_mul(gate_up), ref, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="must be even"):
        silu_mul(_randn(2, 5))


def test_qkv_rope_store_into_two_caches():
    """Decode with rows in different cache layouts: row b's k/v land in its own cache row at its own slot."""
    n_q, n_kv, d = 4, 2, 16
    qkv = _randn(3, 1, (n_q + 2 * n_kv) * d, seed=5)
    cos, sin = _randn(3, 1, d, seed=6), _randn(3, 1, d, seed=7)
    q_out = torch.zeros(3, n_q, 1, d, device=DEVICE)
    full_k, full_v = torch.zeros(2, n_kv, 9, d, device=DEVICE), torch.zeros(2, n_kv, 9, d, device=DEVICE)
    ring_k, ring_v = torch.zeros(1, n_kv, 4, d, device=DEVICE), torch.zeros(1, n_kv, 4, d, device=DEVICE)
    slot, ring_slot = torch.tensor([7, 0, 2], device=DEVICE), torch.tensor([0, 3, 0], device=DEVICE)
    row_ring, row_local = torch.tensor([0, 1, 0], device=DEVICE), torch.tensor([1, 0, 0], device=DEVICE)
    qkv_rope_store(qkv, cos, sin, n_q, n_kv, q_out, full_k, full_v, slot,
                   ring=(ring_k, ring_v, row_ring, row_local, ring_slot))
    want_k = torch.zeros(3, n_kv, 1, d, device=DEVICE)
    want_v = torch.zeros(3, n_kv, 1, d, device=DEVICE)
    want_q = torch.zeros(3, n_q, 1, d, device=DEVICE)
    qkv_rope_store(qkv, cos, sin, n_q, n_kv, want_q, want_k, want_v)
    torch.testing.assert_close(q_out, want_q, atol=0, rtol=0)
    for dst_k, dst_v, row, s, b in ((full_k, full_v, 1, 7, 0), (ring_k, ring_v, 0, 3, 1), (full_k, full_v, 0, 2, 2)):
        torch.testing.assert_close(dst_k[row, :, s], want_k[b, :, 0], atol=0, rtol=0)
        torch.testing.assert_close(dst_v[row, :, s], want_v[b, :, 0], atol=0, rtol=0)
    assert int((full_k != 0).any(-1).sum()) == 2 * n_kv and int((ring_k != 0).any(-1).sum()) == n_kv
