"""Triton split-KV decode attention (one query token per sample) over a KV cache [B, Hkv, T, D].

Why: at decode time attention is a pass over the cache, bound by memory bandwidth. One program per
(split, batch, kv head) reads each K/V tile once for all H/Hkv query heads of that kv head (GQA packing), and the
sequence is split into chunks so that even batch 1 with 4 kv heads puts hundreds of programs on the GPU
(flash-decoding). ``split_merge`` merges the per-chunk partial softmaxes.

The number of splits depends only on the cache capacity T, never on how much of it is filled, so a decode step
with this kernel can be captured once in a CUDA graph and replayed while ``kv_end`` grows on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from flux_kernels._checks import check_pattern, check_per_sample, check_qkv
from flux_kernels.split_merge import merge_split_partials, split_partials

LOG2E = 1.4426950408889634


@triton.jit
def _decode_range(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, lo, hi, qk_scale, offs_d,
                  pos_base, q_pos, sink, window,
                  BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, HAS_POS: tl.constexpr, USE_WINDOW: tl.constexpr):
    """Online-softmax update with cache slots [lo, hi) for the packed query heads q [BLOCK_G, D].

    With HAS_POS each slot carries its real-token position (-1 = empty slot) and visibility is decided on positions:
    causal, and with USE_WINDOW the streaming rule; that serves caches of any slot order (ring buffers).
    """
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        keys = start + offs_n
        in_range = keys < hi
        k = tl.load(k_base + keys[:, None] * stride_kt + offs_d[None, :], mask=in_range[:, None], other=0.0)
        v = tl.load(v_base + keys[:, None] * stride_vt + offs_d[None, :], mask=in_range[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        visible = in_range
        if HAS_POS:
            k_pos = tl.load(pos_base + keys, mask=in_range, other=-1)
            visible = visible & (k_pos >= 0) & (k_pos <= q_pos)
            if USE_WINDOW:
                visible = visible & ((k_pos < sink) | (q_pos - k_pos < window))
        qk = tl.where(visible[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _decode_split_kernel(
    Q, K, V, START, END, KPOS, QPOS, ACC, M, L,
    RK, RV, ROW_RING, ROW_LOCAL, END_RING,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_rkb, stride_rkh, stride_rkt,
    stride_rvb, stride_rvh, stride_rvt,
    stride_pb,
    kv_heads, capacity, chunk, num_splits, sink, window, qk_scale,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_START: tl.constexpr,
    HAS_END: tl.constexpr,
    HAS_POS: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DUAL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // kv_heads
    kv_h = pid_bh % kv_heads
    start_b = 0
    end_b = capacity
    if HAS_START:
        start_b = tl.load(START + b)
    if HAS_END:
        end_b = tl.load(END + b)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    g_ok = offs_g < GROUP
    heads = kv_h * GROUP + offs_g
    q_ptr = Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptr, mask=g_ok[:, None], other=0.0)
    if DUAL:
        # each batch row reads its own cache: row ROW_LOCAL[b] of the full cache, or of the ring cache
        row = tl.load(ROW_LOCAL + b).to(tl.int64)
        if tl.load(ROW_RING + b) != 0:
            end_b = tl.load(END_RING + b)
            k_base = RK + row * stride_rkb + kv_h.to(tl.int64) * stride_rkh
            v_base = RV + row * stride_rvb + kv_h.to(tl.int64) * stride_rvh
            stride_kt = stride_rkt
            stride_vt = stride_rvt
        else:
            k_base = K + row * stride_kb + kv_h.to(tl.int64) * stride_kh
            v_base = V + row * stride_vb + kv_h.to(tl.int64) * stride_vh
    else:
        k_base = K + b.to(tl.int64) * stride_kb + kv_h.to(tl.int64) * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + kv_h.to(tl.int64) * stride_vh

    lo = tl.maximum(pid_s * chunk, start_b)
    hi = tl.minimum(pid_s * chunk + chunk, end_b)
    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    pos_base = KPOS + b.to(tl.int64) * stride_pb
    q_pos = 0
    if HAS_POS:
        q_pos = tl.load(QPOS + b)
    if USE_WINDOW and not HAS_POS:
        # Untrimmed, left-padded cache read by a streaming layer: only sinks [start, start+sink) and the last
        # `window` slots before end are visited.
        sink_hi = tl.minimum(hi, start_b + sink)
        acc, l_i, m_i = _decode_range(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, lo, sink_hi,
                                      qk_scale, offs_d, pos_base, q_pos, sink, window,
                                      BLOCK_N, PRECISION, False, False)
        win_lo = tl.maximum(lo, tl.maximum(end_b - window, start_b + sink))
        acc, l_i, m_i = _decode_range(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, win_lo, hi,
                                      qk_scale, offs_d, pos_base, q_pos, sink, window,
                                      BLOCK_N, PRECISION, False, False)
    else:
        acc, l_i, m_i = _decode_range(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, lo, hi,
                                      qk_scale, offs_d, pos_base, q_pos, sink, window,
                                      BLOCK_N, PRECISION, HAS_POS, USE_WINDOW)

    # Partials live at [(b * H + head) * num_splits + split]; unnormalised acc, running max m and sum l.
    row = (b * kv_heads * GROUP + heads).to(tl.int64) * num_splits + pid_s
    tl.store(M + row, m_i, mask=g_ok)
    tl.store(L + row, l_i, mask=g_ok)
    tl.store(ACC + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_ok[:, None])


@dataclass(frozen=True)
class DecodePlan:
    """Static launch shape for one cache capacity; fixed so that a CUDA graph can replay it."""

    chunk: int
    num_splits: int
    block_n: int
    num_warps: int
    num_stages: int


def plan_decode(batch: int, kv_heads: int, capacity: int, device: torch.device, dtype: torch.dtype,
                chunk: int | None = None, block_n: int | None = None, programs_per_sm: int = 8,
                min_blocks: int = 8) -> DecodePlan:
    """Pick chunk length so that batch * kv_heads * splits gives ~8 programs per SM (small enough waves that the
    last one costs little; measured 5% slower at 4 per SM), with chunks of at least `min_blocks` key blocks (short
    caches at batch 1 otherwise split into hundreds of two-block programs whose merge costs more than they save; 8
    blocks measured 15% faster than 4 for one 32k full-cache layer on an H200 and level at 128k, kernels.decode in
    experiments/speed/h200_engine_v2/bench.json)."""
    on_gpu = device.type == "cuda"
    bn = block_n or (64 if on_gpu and dtype != torch.float32 else 32 if on_gpu else 16)
    if chunk is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if on_gpu else 4
        want_splits = max(1, triton.cdiv(programs_per_sm * sms, batch * kv_heads))
        chunk = max(min_blocks * bn, triton.cdiv(triton.cdiv(capacity, want_splits), bn) * bn)
    elif chunk % bn != 0 or chunk <= 0:
        raise ValueError(f"decode_attention: chunk={chunk} must be a positive multiple of block_n={bn}")
    splits = max(1, triton.cdiv(capacity, chunk))
    return DecodePlan(chunk=chunk, num_splits=splits, block_n=bn, num_warps=4 if on_gpu else 1,
                      num_stages=3 if on_gpu else 1)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
    sink: int = 0,
    window: int | None = None,
    scale: float | None = None,
    plan: DecodePlan | None = None,
    kv_pos: torch.Tensor | None = None,
    q_pos: torch.Tensor | None = None,
    ring: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One-token attention: q [B, H, 1, D] over caches [B, Hkv, T, D] -> [B, H, 1, D] in q's dtype.

    Two ways to say which slots a sample sees:
      * ranges (fast path): slots [kv_start_b, kv_end_b) (int [B] device tensors; defaults 0 and T). Left-padded
        full caches pass kv_start = pad; ring buffers filled from slot 0 pass kv_end = filled slots. With ``window``
        set, an untrimmed cache is read as a streaming layer would (sinks counted from kv_start, the last ``window``
        slots before kv_end), visiting only those blocks.
      * positions: ``kv_pos`` [B, T] int real-token position per slot (-1 = empty) and ``q_pos`` [B] the query's
        position; a slot is seen iff 0 <= kv_pos <= q_pos and, with ``window``, kv_pos < sink or
        q_pos - kv_pos < window. Serves caches of any slot order (ring buffers).
    Pass the same ``plan`` on every step of a captured CUDA graph (``plan_decode``); the default is recomputed
    from the shapes and is equally static.

    Two caches at once (a batch whose rows keep different KV layouts): ``ring = (ring_k, ring_v, row_is_ring,
    row_local, ring_end)``. Row b then reads row ``row_local[b]`` of ``k_cache``/``v_cache`` (slots [0, kv_end_b))
    when ``row_is_ring[b] == 0``, else row ``row_local[b]`` of ``ring_k``/``ring_v`` (slots [0, ring_end_b)); the
    caches hold only their own rows, so they may have fewer rows than the batch. Ranges mode only.
    """
    what = "decode_attention"
    if ring is not None:
        return _decode_dual(q, k_cache, v_cache, kv_end, scale, plan, ring)
    batch, heads, kv_heads, q_len, capacity, head_dim = check_qkv(q, k_cache, v_cache, what)
    if q_len != 1:
        raise ValueError(f"{what}: expected one query token per sample (q [B, H, 1, D]), got Tq={q_len}")
    check_pattern(sink, window, what)
    start = check_per_sample(kv_start, batch, "kv_start", q.device, what)
    end = check_per_sample(kv_end, batch, "kv_end", q.device, what)
    if (kv_pos is None) != (q_pos is None):
        raise ValueError(f"{what}: kv_pos and q_pos go together; pass both or neither")
    qp = check_per_sample(q_pos, batch, "q_pos", q.device, what)
    if kv_pos is not None:
        if kv_pos.shape != (batch, capacity) or kv_pos.dtype.is_floating_point or kv_pos.dtype == torch.bool:
            raise ValueError(f"{what}: kv_pos must be an integer tensor [B, T]=({batch}, {capacity}), "
                             f"got {kv_pos.dtype} {tuple(kv_pos.shape)}")
        kv_pos = kv_pos.to(torch.int32)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    plan = plan or plan_decode(batch, kv_heads, capacity, q.device, q.dtype)
    group = heads // kv_heads

    part_acc, part_m, part_l = _partials(q, plan)
    dummy = part_m
    _decode_split_kernel[(plan.num_splits, batch * kv_heads)](
        q, k_cache, v_cache, start if start is not None else dummy, end if end is not None else dummy,
        kv_pos if kv_pos is not None else dummy, qp if qp is not None else dummy,
        part_acc, part_m, part_l,
        k_cache, v_cache, dummy, dummy, dummy,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        0, 0, 0, 0, 0, 0,
        kv_pos.stride(0) if kv_pos is not None else 0,
        kv_heads, capacity, plan.chunk, plan.num_splits, int(sink), 0 if window is None else int(window), scale * LOG2E,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_N=plan.block_n,
        HAS_START=start is not None, HAS_END=end is not None,
        HAS_POS=kv_pos is not None, USE_WINDOW=window is not None, DUAL=False,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    return _merge(part_acc, part_m, part_l, q, plan)


def _partials(q: torch.Tensor, plan: DecodePlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-split buffers (unnormalised output, running max, running sum) of every (batch, head) row."""
    return split_partials(q.shape[0] * q.shape[1], plan.num_splits, q.shape[-1], q.device)


def _merge(part_acc: torch.Tensor, part_m: torch.Tensor, part_l: torch.Tensor, q: torch.Tensor,
           plan: DecodePlan) -> torch.Tensor:
    """The reduce launch: one output row per (batch, head) from its splits' partial softmaxes."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    merge_split_partials(part_acc, part_m, part_l, out, plan.num_splits)
    return out


def _decode_dual(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_end: torch.Tensor | None,
                 scale: float | None, plan: DecodePlan | None,
                 ring: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """decode_attention over two caches, each batch row reading its own (see decode_attention's docstring)."""
    what = "decode_attention(ring=...)"
    ring_k, ring_v, row_ring, row_local, ring_end = ring
    batch, heads, _, head_dim = q.shape
    check_qkv(q[: k_cache.shape[0]], k_cache, v_cache, what)
    check_qkv(q[: ring_k.shape[0]], ring_k, ring_v, what)
    kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
    if ring_k.shape[1] != kv_heads or ring_k.shape[2] > capacity:
        raise ValueError(f"{what}: the ring cache {tuple(ring_k.shape)} must have the full cache's kv heads and at "
                         f"most its {capacity} slots")
    end = check_per_sample(kv_end, batch, "kv_end", q.device, what)
    ring_end = check_per_sample(ring_end, batch, "ring_end", q.device, what)
    row_ring = check_per_sample(row_ring, batch, "row_is_ring", q.device, what)
    row_local = check_per_sample(row_local, batch, "row_local", q.device, what)
    if end is None:
        raise ValueError(f"{what}: kv_end is required with two caches")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    plan = plan or plan_decode(batch, kv_heads, capacity, q.device, q.dtype)
    group = heads // kv_heads
    part_acc, part_m, part_l = _partials(q, plan)
    _decode_split_kernel[(plan.num_splits, batch * kv_heads)](
        q, k_cache, v_cache, part_m, end, part_m, part_m, part_acc, part_m, part_l,
        ring_k, ring_v, row_ring, row_local, ring_end,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        ring_k.stride(0), ring_k.stride(1), ring_k.stride(2),
        ring_v.stride(0), ring_v.stride(1), ring_v.stride(2),
        0, kv_heads, capacity, plan.chunk, plan.num_splits, 0, 0, scale * LOG2E,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_N=plan.block_n,
        HAS_START=False, HAS_END=True, HAS_POS=False, USE_WINDOW=False, DUAL=True,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    return _merge(part_acc, part_m, part_l, q, plan)
