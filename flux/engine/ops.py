"""The engine's numeric building blocks, in two interchangeable implementations.

`TritonOps` runs flux's fused Triton kernels (add+RMSNorm, rotary + cache store, SiLU-mul, split-KV decode): the
fast path on CUDA, and under `TRITON_INTERPRET=1` on CPU in tests. `TorchOps` runs the transformers modules
themselves (their RMSNorm, their rotary function) and SDPA: the CPU default, numerically the model as transformers
defines it. Both take and return the same shapes, so prefill and decode are written once.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from flux.engine.parts import Block, EngineError, ModelParts

KERNEL_CHOICES = ("auto", "triton", "torch")


class TorchOps:
    """transformers' own modules and torch SDPA."""

    name = "torch"

    def norm(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return module(x)

    def add_norm(self, delta: torch.Tensor, residual: torch.Tensor,
                 module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + delta), residual + delta): a block's residual add and the next norm."""
        summed = residual + delta
        return module(summed), summed

    def project_rope(self, parts: ModelParts, blk: Block, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     q_out: torch.Tensor | None, k_out: torch.Tensor | None, v_out: torch.Tensor | None,
                     slot: torch.Tensor | None = None, ring: tuple | None = None) -> None:
        """Project h [B, T, hidden] to q/k/v, apply the per-head norms (Qwen3) and rotary, and store them: q into
        q_out [B, H, T, D], k/v into k_out/v_out [B, Hkv, S, D] at time index t (or slot_b + t with `slot` [B],
        which decode uses with T = 1). An output given as None is neither projected nor stored. `ring` = (ring_k,
        ring_v, row_is_ring, row_local, ring_slot): decode rows go to their own row of k_out or of the ring cache
        (see flux_kernels.fused_ops.qkv_rope_store)."""
        b, t, _ = h.shape
        d, nq, nkv = parts.head_dim, parts.n_q * parts.head_dim, parts.n_kv * parts.head_dim
        w, bias = _qkv_rows(blk, nq, nkv, q_out is not None, k_out is not None)
        qkv = F.linear(h, w, bias)
        off = 0
        q = k = None
        if q_out is not None:
            q = qkv[..., :nq].view(b, t, parts.n_q, d)
            q = (blk.q_norm(q) if blk.q_norm is not None else q).transpose(1, 2)
            off = nq
        if k_out is not None:
            k = qkv[..., off:off + nkv].view(b, t, parts.n_kv, d)
            k = (blk.k_norm(k) if blk.k_norm is not None else k).transpose(1, 2)
            v = qkv[..., off + nkv:].view(b, t, parts.n_kv, d).transpose(1, 2)
        if q is not None and k is not None:
            q, k = parts.apply_rope(q, k, cos, sin)
        elif q is not None:
            q, _ = parts.apply_rope(q, q[:, :1], cos, sin)
        else:
            _, k = parts.apply_rope(k[:, :1], k, cos, sin)
        if q is not None:
            q_out.copy_(q)
        if k is None:
            return
        if slot is None:
            k_out[:, :, :t].copy_(k)
            v_out[:, :, :t].copy_(v)
        elif ring is None:
            rows = torch.arange(b, device=h.device)
            k_out[rows, :, slot.long()] = k[:, :, 0]
            v_out[rows, :, slot.long()] = v[:, :, 0]
        else:
            ring_k, ring_v, row_ring, row_local, ring_slot = ring
            for to_ring, dst_k, dst_v, slots in ((False, k_out, v_out, slot), (True, ring_k, ring_v, ring_slot)):
                rows = (row_ring.bool() == to_ring).nonzero().squeeze(1)
                dst_k[row_local[rows].long(), :, slots[rows].long()] = k[rows, :, 0]
                dst_v[row_local[rows].long(), :, slots[rows].long()] = v[rows, :, 0]

    def mlp(self, blk: Block, h: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(h, blk.gate_up_w, blk.gate_up_b).chunk(2, dim=-1)
        return blk.down(F.silu(gate) * up)

    def decode_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, end: torch.Tensor, scale: float,
                         plan=None, ring: tuple | None = None) -> torch.Tensor:
        """One query per row over cache slots [0, end_b): q [n, H, 1, D], caches [n, Hkv, S, D] -> [n, H, 1, D].
        `ring` = (ring_k, ring_v, row_is_ring, row_local, ring_end): each row reads its own row of k/v or of the
        ring cache (flux_kernels.decode.decode_attention's two-cache mode)."""
        if ring is not None:
            ring_k, ring_v, row_ring, row_local, ring_end = ring
            out = torch.empty_like(q)
            for to_ring, ck, cv, ends in ((False, k, v, end), (True, ring_k, ring_v, ring_end)):
                rows = (row_ring.bool() == to_ring).nonzero().squeeze(1)
                local = row_local[rows].long()
                out[rows] = self.decode_attention(q[rows], ck[local], cv[local], ends[rows], scale)
            return out
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        mask = torch.arange(k.shape[2], device=q.device)[None, :] < end[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], scale=scale)

    def decode_plan(self, batch: int, n_kv: int, capacity: int, device: torch.device, dtype: torch.dtype,
                    ring: bool = False):
        return None


class TritonOps(TorchOps):
    """flux's fused Triton kernels (each tested against the transformers module it replaces)."""

    name = "triton"

    def __init__(self) -> None:
        from flux_kernels import decode, fused_ops

        self._decode, self._fused = decode, fused_ops

    def norm(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self._fused.add_rms_norm(x, module.weight, module.variance_epsilon)[0]

    def add_norm(self, delta: torch.Tensor, residual: torch.Tensor,
                 module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return self._fused.add_rms_norm(delta, module.weight, module.variance_epsilon, residual)

    def project_rope(self, parts: ModelParts, blk: Block, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     q_out: torch.Tensor | None, k_out: torch.Tensor | None, v_out: torch.Tensor | None,
                     slot: torch.Tensor | None = None, ring: tuple | None = None) -> None:
        b, t, _ = h.shape
        d, nq, nkv = parts.head_dim, parts.n_q * parts.head_dim, parts.n_kv * parts.head_dim
        w, bias = _qkv_rows(blk, nq, nkv, q_out is not None, k_out is not None)
        qkv = F.linear(h, w, bias)
        n_q = parts.n_q if q_out is not None else 0
        n_kv = parts.n_kv if k_out is not None else 0
        if blk.q_norm is not None:
            if n_q:
                q = qkv[..., :nq].view(b, t, parts.n_q, d)
                q.copy_(blk.q_norm(q))
            if n_kv:
                k = qkv[..., n_q * d:n_q * d + nkv].view(b, t, parts.n_kv, d)
                k.copy_(blk.k_norm(k))
        dummy = cos.new_empty(b, 1, 1, d)
        self._fused.qkv_rope_store(qkv, cos, sin, n_q, n_kv, q_out if q_out is not None else dummy,
                                   k_out if k_out is not None else dummy, v_out if v_out is not None else dummy,
                                   slot, ring)

    def mlp(self, blk: Block, h: torch.Tensor) -> torch.Tensor:
        return blk.down(self._fused.silu_mul(F.linear(h, blk.gate_up_w, blk.gate_up_b)))

    def decode_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, end: torch.Tensor, scale: float,
                         plan=None, ring: tuple | None = None) -> torch.Tensor:
        return self._decode.decode_attention(q, k, v, None, end, scale=scale, plan=plan, ring=ring)

    def decode_plan(self, batch: int, n_kv: int, capacity: int, device: torch.device, dtype: torch.dtype,
                    ring: bool = False):
        # a sink + window ring keeps the 4-block minimum split it was measured with (H200, v2: every layer SA at
        # 1.32-1.33x the bandwidth limit; v3 with 8 blocks: 1.37x); full caches take the default 8
        if ring:
            return self._decode.plan_decode(batch, n_kv, capacity, device, dtype, min_blocks=4)
        return self._decode.plan_decode(batch, n_kv, capacity, device, dtype)


def _qkv_rows(blk: Block, nq: int, nkv: int, want_q: bool, want_kv: bool):
    """Row slices of the fused q/k/v matrix: all of it, only q, or only k/v (contiguous views, no copy)."""
    if want_q and want_kv:
        return blk.qkv_w, blk.qkv_b
    rows = slice(0, nq) if want_q else slice(nq, nq + 2 * nkv)
    return blk.qkv_w[rows], None if blk.qkv_b is None else blk.qkv_b[rows]


def make_ops(kernels: str, device: torch.device) -> TorchOps:
    """`auto`: Triton on CUDA, the transformers modules elsewhere; `triton` on CPU needs TRITON_INTERPRET=1."""
    if kernels not in KERNEL_CHOICES:
        raise EngineError(f"unknown kernels={kernels!r}; choose one of {', '.join(KERNEL_CHOICES)}")
    if kernels == "auto":
        kernels = "triton" if device.type == "cuda" else "torch"
    if kernels == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise EngineError("kernels='triton' on a CPU model needs Triton's interpreter: set TRITON_INTERPRET=1 before "
                          "Python starts (tests do), or use kernels='torch' / 'auto' on CPU")
    return TritonOps() if kernels == "triton" else TorchOps()
