"""The merge step of split-K attention, shared by split-KV decode and the split-K prefill of a few last queries.

A split-K kernel cuts each query row's keys into ``num_splits`` chunks and writes, per (row, split), a partial
softmax: the unnormalised output acc [D], the running max m and the running sum l (scores in log2 units). The
merge rescales the partials to their common max and divides once. Rows are (batch, query, head) in that order,
row = (b * Tq + t) * H + h, and the partials of one row are contiguous: ACC[row * num_splits + split, :],
M/L[row * num_splits + split].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _split_merge_kernel(ACC, M, L, O, stride_ob, stride_oh, stride_ot, heads, q_rows, num_splits,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Merge the num_splits partial softmaxes of one (batch, query, head) row for a BLOCK_D slice of head_dim (the
    slices run as separate programs so the merge is not latency-bound on a few SMs); rows with no key give zeros."""
    pid = tl.program_id(0)
    d0 = tl.program_id(1) * BLOCK_D
    h = pid % heads
    t = (pid // heads) % q_rows
    b = pid // (heads * q_rows)
    base = pid.to(tl.int64) * num_splits
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = d0 + tl.arange(0, BLOCK_D)
    m_max = tl.full([BLOCK_S], -1.0e30, dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        ok = (s0 + offs_s) < num_splits
        m_max = tl.maximum(m_max, tl.load(M + base + s0 + offs_s, mask=ok, other=-1.0e30))
    m_all = tl.max(m_max, 0)
    total = tl.zeros([BLOCK_D], dtype=tl.float32)
    denom = tl.zeros([BLOCK_S], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        ok = (s0 + offs_s) < num_splits
        m = tl.load(M + base + s0 + offs_s, mask=ok, other=-1.0e30)
        lsum = tl.load(L + base + s0 + offs_s, mask=ok, other=0.0)
        w = tl.exp2(m - m_all)
        denom += w * lsum
        part = tl.load(ACC + (base + s0 + offs_s)[:, None] * HEAD_DIM + offs_d[None, :], mask=ok[:, None], other=0.0)
        total += tl.sum(part * w[:, None], 0)
    d = tl.sum(denom, 0)
    out = total / tl.where(d > 0.0, d, 1.0)
    o_row = O + b.to(tl.int64) * stride_ob + t.to(tl.int64) * stride_ot + h.to(tl.int64) * stride_oh
    tl.store(o_row + offs_d, out.to(O.dtype.element_ty))


def split_partials(rows: int, num_splits: int, head_dim: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty partial buffers (acc [rows * num_splits, D], m and l [rows * num_splits]) in float32; the split-K
    kernel writes every entry, also for splits that hold no visible key (acc 0, m -1e30, l 0)."""
    part_m = torch.empty(rows * num_splits, dtype=torch.float32, device=device)
    return torch.empty(rows * num_splits, head_dim, dtype=torch.float32, device=device), part_m, torch.empty_like(part_m)


def merge_split_partials(part_acc: torch.Tensor, part_m: torch.Tensor, part_l: torch.Tensor, out: torch.Tensor,
                         num_splits: int) -> None:
    """Write the merged rows into ``out`` [B, H, Tq, D] (any strides, unit stride in D; e.g. a slice of a larger
    output), row (b, t, h) from partials row (b * Tq + t) * H + h."""
    batch, heads, q_rows, head_dim = out.shape
    block_d = min(head_dim, 32)
    _split_merge_kernel[(batch * q_rows * heads, head_dim // block_d)](
        part_acc, part_m, part_l, out, out.stride(0), out.stride(1), out.stride(2), heads, q_rows, num_splits,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=min(32, triton.next_power_of_2(num_splits)),
        num_warps=4 if out.device.type == "cuda" else 1,
    )
