"""Small fused Triton ops for the decode step of a Llama/Qwen-style block.

Why: at batch 1 a decode step is ~30 elementwise launches per layer when written with torch ops, and even inside a
CUDA graph each costs microseconds; fusing them keeps the step close to the memory-bandwidth limit. Each op rounds
to the model dtype at the same points as the transformers module it replaces (RMSNorm, rotary embedding, SiLU-gated
MLP), so it matches them exactly in fp32 and to within one bf16 ulp in bf16 (measured on an H100):
  * add + RMSNorm: residual sum rounded to the model dtype, normalised in fp32, cast, then scaled by the weight.
  * rotary: x*cos and rotate_half(x)*sin each rounded to the model dtype before their (rounded) sum.
  * SiLU-mul: silu(gate) rounded, times up, rounded.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(X, R, W, Y, RES_OUT, stride_x, stride_r, stride_y, stride_ro, n_cols, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
        x = (x + r).to(Y.dtype.element_ty).to(tl.float32)
        tl.store(RES_OUT + row * stride_ro + cols, x.to(Y.dtype.element_ty), mask=ok)
    var = tl.sum(x * x, 0) / n_cols
    y = (x * tl.rsqrt(var + eps)).to(Y.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (w * y).to(Y.dtype.element_ty), mask=ok)


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim of x [..., C]; with ``residual``, normalises x + residual.

    Returns (normed, new_residual) where new_residual is x + residual (or x itself without a residual).
    """
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(f"add_rms_norm: x has {x.shape[-1]} features but weight has {weight.shape[0]}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"add_rms_norm: residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    cols = x.shape[-1]
    x2 = x.reshape(-1, cols)
    y = torch.empty_like(x2)
    res_out = torch.empty_like(x2) if residual is not None else x2
    r2 = residual.reshape(-1, cols) if residual is not None else x2
    _add_rms_norm_kernel[(x2.shape[0],)](
        x2, r2, weight, y, res_out, x2.stride(0), r2.stride(0), y.stride(0), res_out.stride(0), cols, float(eps),
        HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(cols),
        num_warps=8 if x.device.type == "cuda" and cols >= 2048 else 4 if x.device.type == "cuda" else 1,
    )
    return y.view_as(x), res_out.view_as(x)


@triton.jit
def _qkv_rope_store_kernel(
    QKV, COS, SIN, QO, KC, VC, SLOT,
    RK, RV, ROW_RING, ROW_LOCAL, SLOT_RING,
    stride_xb, stride_xt, stride_cb, stride_ct,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_rkb, stride_rkh, stride_rkt,
    stride_rvb, stride_rvh, stride_rvt,
    seq_len, n_q, n_kv,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, HAS_SLOT: tl.constexpr, DUAL: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(1)
    head = tl.program_id(2)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.arange(0, HEAD_DIM // 2)
    HALF = HEAD_DIM // 2
    t_ok = (offs_t < seq_len)[:, None]
    src = QKV + b.to(tl.int64) * stride_xb + offs_t[:, None].to(tl.int64) * stride_xt + head * HEAD_DIM
    x1 = tl.load(src + offs_h[None, :], mask=t_ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + offs_h[None, :], mask=t_ok, other=0.0).to(tl.float32)
    slot = 0
    if HAS_SLOT:
        slot = tl.load(SLOT + b)
    # where this row's k/v go: row b of KC/VC, or (DUAL) row ROW_LOCAL[b] of the full or the ring cache
    kv_row = b.to(tl.int64)
    if DUAL:
        kv_row = tl.load(ROW_LOCAL + b).to(tl.int64)
        if tl.load(ROW_RING + b) != 0:
            slot = tl.load(SLOT_RING + b)
            KC = RK
            VC = RV
            stride_kb = stride_rkb
            stride_kh = stride_rkh
            stride_kt = stride_rkt
            stride_vb = stride_rvb
            stride_vh = stride_rvh
            stride_vt = stride_rvt
    if head < n_q + n_kv:
        cs = b.to(tl.int64) * stride_cb + offs_t[:, None].to(tl.int64) * stride_ct
        c1 = tl.load(COS + cs + offs_h[None, :], mask=t_ok, other=0.0).to(tl.float32)
        c2 = tl.load(COS + cs + HALF + offs_h[None, :], mask=t_ok, other=0.0).to(tl.float32)
        s1 = tl.load(SIN + cs + offs_h[None, :], mask=t_ok, other=0.0).to(tl.float32)
        s2 = tl.load(SIN + cs + HALF + offs_h[None, :], mask=t_ok, other=0.0).to(tl.float32)
        # HF rotary: out = x*cos + cat(-x2, x1)*sin, each product and the sum rounded to the model dtype.
        dt = QO.dtype.element_ty
        o1 = ((x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)).to(dt)
        o2 = ((x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)).to(dt)
        if head < n_q:
            dst = QO + b.to(tl.int64) * stride_qb + head * stride_qh + offs_t[:, None].to(tl.int64) * stride_qt
        else:
            kh = head - n_q
            pos = (slot + offs_t[:, None]).to(tl.int64)
            dst = KC + kv_row * stride_kb + kh.to(tl.int64) * stride_kh + pos * stride_kt
        tl.store(dst + offs_h[None, :], o1, mask=t_ok)
        tl.store(dst + HALF + offs_h[None, :], o2, mask=t_ok)
    else:
        vh = head - n_q - n_kv
        pos = (slot + offs_t[:, None]).to(tl.int64)
        dst = VC + kv_row * stride_vb + vh.to(tl.int64) * stride_vh + pos * stride_vt
        tl.store(dst + offs_h[None, :], x1.to(VC.dtype.element_ty), mask=t_ok)
        tl.store(dst + HALF + offs_h[None, :], x2.to(VC.dtype.element_ty), mask=t_ok)


def qkv_rope_store(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_q: int, n_kv: int,
                   q_out: torch.Tensor, k_dst: torch.Tensor, v_dst: torch.Tensor,
                   slot: torch.Tensor | None = None,
                   ring: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                   ) -> None:
    """Split a fused projection qkv [B, T, (n_q + 2 n_kv) * D], rotate q and k, and store all three in one launch.

    q goes to q_out [B, n_q, T, D]; k and v go to k_dst/v_dst [B, n_kv, S, D] at time index slot_b + t
    (``slot`` int [B] on the device, None = 0), which is how decode writes into a cache without a host sync.
    cos/sin are [B, T, D] as the model's rotary module returns them. All destinations may be strided views.
    ``ring = (ring_k, ring_v, row_is_ring, row_local, ring_slot)`` (decode, T = 1) sends row b's k/v to row
    ``row_local[b]`` of k_dst/v_dst at ``slot[b]``, or, where ``row_is_ring[b]``, of ring_k/ring_v at
    ``ring_slot[b]``: one launch for a batch whose rows keep different cache layouts.
    """
    batch, seq_len, width = qkv.shape
    head_dim = q_out.shape[-1]
    if width != (n_q + 2 * n_kv) * head_dim:
        raise ValueError(f"qkv_rope_store: qkv width {width} != (n_q + 2*n_kv) * head_dim = "
                         f"{(n_q + 2 * n_kv) * head_dim}")
    if cos.shape != (batch, seq_len, head_dim) or sin.shape != cos.shape:
        raise ValueError(f"qkv_rope_store: cos/sin must be [B, T, D]=({batch}, {seq_len}, {head_dim}), "
                         f"got {tuple(cos.shape)}")
    if qkv.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride() != cos.stride():
        raise ValueError("qkv_rope_store: qkv/cos/sin need unit stride in the feature dim and cos/sin equal strides")
    if ring is not None and (seq_len != 1 or slot is None):
        raise ValueError("qkv_rope_store: two destination caches are for decode (T = 1) with per-row slots")
    block_t = 1 if seq_len == 1 else 32 if qkv.device.type == "cuda" else 8
    grid = (triton.cdiv(seq_len, block_t), batch, n_q + 2 * n_kv)
    ring_k, ring_v, row_ring, row_local, ring_slot = ring if ring is not None else (k_dst, v_dst, cos, cos, cos)
    _qkv_rope_store_kernel[grid](
        qkv, cos, sin, q_out, k_dst, v_dst, slot if slot is not None else cos,
        ring_k, ring_v, row_ring, row_local, ring_slot,
        qkv.stride(0), qkv.stride(1), cos.stride(0), cos.stride(1),
        q_out.stride(0), q_out.stride(1), q_out.stride(2),
        k_dst.stride(0), k_dst.stride(1), k_dst.stride(2),
        v_dst.stride(0), v_dst.stride(1), v_dst.stride(2),
        ring_k.stride(0), ring_k.stride(1), ring_k.stride(2),
        ring_v.stride(0), ring_v.stride(1), ring_v.stride(2),
        seq_len, n_q, n_kv,
        HEAD_DIM=head_dim, BLOCK_T=block_t, HAS_SLOT=slot is not None, DUAL=ring is not None,
        num_warps=4 if qkv.device.type == "cuda" else 1,
    )


@triton.jit
def _silu_mul_kernel(GU, Y, stride_g, stride_y, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < inter
    g = tl.load(GU + row * stride_g + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(GU + row * stride_g + inter + cols, mask=ok, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (act * u).to(Y.dtype.element_ty), mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for a fused projection gate_up [..., 2 * I] laid out as [gate | up] -> [..., I]."""
    width = gate_up.shape[-1]
    if width % 2 != 0:
        raise ValueError(f"silu_mul: gate_up width {width} must be even ([gate | up])")
    inter = width // 2
    g2 = gate_up.reshape(-1, width)
    y = torch.empty(g2.shape[0], inter, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024 if gate_up.device.type == "cuda" else 64
    _silu_mul_kernel[(g2.shape[0], triton.cdiv(inter, block))](g2, y, g2.stride(0), y.stride(0), inter, BLOCK=block)
    return y.view(*gate_up.shape[:-1], inter)
