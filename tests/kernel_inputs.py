"""Random attention inputs for the Triton kernel tests, on the GPU when there is one and through Triton's CPU
interpreter otherwise (switched on here, before any kernel module is imported)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from flux_kernels.interpret import use_interpreter_without_cuda

use_interpreter_without_cuda()

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_qkv(batch, heads, kv_heads, q_len, kv_len, dim, dtype=torch.float32, seed=0):
    """q [B, H, Tq, D], k/v [B, Hkv, Tk, D] from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, dim, generator=g).to(DEVICE, dtype)
    k = torch.randn(batch, kv_heads, kv_len, dim, generator=g).to(DEVICE, dtype)
    v = torch.randn(batch, kv_heads, kv_len, dim, generator=g).to(DEVICE, dtype)
    return q, k, v
