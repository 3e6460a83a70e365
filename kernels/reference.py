"""Plain-torch references for flux's kernels: streaming (sink + window, optionally with dense last rows),
decode, and XAttention's antidiagonal block scoring, block selection and block-sparse attention, all with left
padding and GQA.

These are the specifications the Triton kernels are tested against: dense boolean masks, float64 math, no tricks.
They are O(Tq * Tk) in memory, so use them only for tests and small shapes.
"""

from __future__ import annotations

import math

import torch


def streaming_mask(
    q_len: int,
    kv_len: int,
    kv_pad: torch.Tensor | None,
    sink: int,
    window: int | None,
    batch: int,
    device: torch.device | str = "cpu",
    dense_last: int = 0,
) -> torch.Tensor:
    """Boolean mask [B, q_len, kv_len]: True where query i may attend key j.

    Queries are the last ``q_len`` positions of the ``kv_len`` keys. Key j is visible to query i iff j is a real
    token (j >= pad_b), j <= i (causal), and (p_j < sink or p_i - p_j < window) with p = j - pad_b the real-token
    position. ``window=None`` means plain causal attention (no sparsity). The last ``dense_last`` keys' queries
    (i >= kv_len - dense_last: the last real positions of every left-padded sample) see every causal key.
    """
    pad = torch.zeros(batch, dtype=torch.long, device=device) if kv_pad is None else kv_pad.to(device, torch.long)
    i = torch.arange(kv_len - q_len, kv_len, device=device).view(1, q_len, 1)
    j = torch.arange(kv_len, device=device).view(1, 1, kv_len)
    pad = pad.view(batch, 1, 1)
    visible = (j >= pad) & (j <= i)
    if window is not None:
        visible = visible & (((j - pad) < sink) | ((i - j) < window) | (i >= kv_len - dense_last))
    return visible


def masked_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                               scale: float | None = None) -> torch.Tensor:
    """Softmax attention in float64 under a boolean mask [B, 1 or H, Tq, Tk] -> [B, H, Tq, D] in q's dtype.

    Query rows with no visible key (left-padding rows) return zeros, matching the kernels. Differentiable in q/k/v.
    """
    heads, head_dim = q.shape[1], q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    group = heads // k.shape[1]
    k64 = k.double().repeat_interleave(group, dim=1)
    v64 = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k64) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    has_key = mask.any(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~has_key, 0.0), dim=-1) * has_key
    return torch.einsum("bhqk,bhkd->bhqd", probs, v64).to(q.dtype)


def streaming_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_pad: torch.Tensor | None = None,
    sink: int = 0,
    window: int | None = None,
    scale: float | None = None,
    dense_last: int = 0,
) -> torch.Tensor:
    """Exact streaming attention in float64. q [B, H, Tq, D], k/v [B, Hkv, Tk, D] -> [B, H, Tq, D] (q's dtype).

    Query rows with no visible key (left-padding rows) return zeros, matching the kernels. ``dense_last``: see
    ``streaming_mask`` (the triangle pattern's dense last rows).
    """
    batch, q_len, kv_len = q.shape[0], q.shape[2], k.shape[2]
    mask = streaming_mask(q_len, kv_len, kv_pad, sink, window, batch, q.device, dense_last).unsqueeze(1)
    return masked_attention_reference(q, k, v, mask, scale)


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
    sink: int = 0,
    window: int | None = None,
    scale: float | None = None,
    kv_pos: torch.Tensor | None = None,
    q_pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact one-token decode attention in float64 over cache slots [kv_start_b, kv_end_b).

    q [B, H, 1, D], caches [B, Hkv, T, D]. With ``window`` set, the query is the token at slot kv_end_b - 1 and
    only slots with p_j < sink or p_i - p_j < window count (p = slot - kv_start_b), as for an untrimmed cache.
    With ``kv_pos`` [B, T] (-1 = empty slot) and ``q_pos`` [B], visibility is decided on those positions instead.
    """
    batch, heads, _, head_dim = q.shape
    kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    device = q.device
    start = torch.zeros(batch, dtype=torch.long, device=device) if kv_start is None else kv_start.long()
    end = torch.full((batch,), capacity, dtype=torch.long, device=device) if kv_end is None else kv_end.long()
    j = torch.arange(capacity, device=device).view(1, capacity)
    start, end = start.view(batch, 1), end.view(batch, 1)
    visible = (j >= start) & (j < end)
    if kv_pos is not None:
        kp, qp = kv_pos.long(), q_pos.long().view(batch, 1)
        visible = visible & (kp >= 0) & (kp <= qp)
        if window is not None:
            visible = visible & ((kp < sink) | ((qp - kp) < window))
    elif window is not None:
        visible = visible & (((j - start) < sink) | ((end - 1 - j) < window))
    group = heads // kv_heads
    k64 = k_cache.double().repeat_interleave(group, dim=1)
    v64 = v_cache.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k64) * scale
    mask = visible.view(batch, 1, 1, capacity)
    scores = scores.masked_fill(~mask, float("-inf"))
    has_key = mask.any(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~has_key, 0.0), dim=-1) * has_key
    return torch.einsum("bhqk,bhkd->bhqd", probs, v64).to(q.dtype)


# ------------------------------------------------------------------------------------------------ XAttention
def left_padding_valid(kv_pad: torch.Tensor | None, batch: int, length: int,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """[B, length] bool: True at real tokens of left-padded samples (index >= pad_b)."""
    pad = torch.zeros(batch, dtype=torch.long, device=device) if kv_pad is None else kv_pad.to(device, torch.long)
    return torch.arange(length, device=device).view(1, length) >= pad.view(batch, 1)


def xattn_block_scores_reference(q: torch.Tensor, k: torch.Tensor, kv_pad: torch.Tensor | None, block_size: int,
                                 stride: int, scale: float | None = None) -> torch.Tensor:
    """XAttention's block importance in float64: [B, H, NB, NB] with NB = ceil(T / block_size).

    The prompt (q and k over the same T tokens, left padding zeroed) is cut into stride x stride tiles. Tile (r, c)
    is scored by its antidiagonal, sum_j q[r*S + S-1-j] . k[c*S + j], times scale / S. Each strided row r takes a
    softmax over the strided columns c <= r that hold a real key; the block score of (query block, key block) is
    the sum of those probabilities over the block's strided rows and columns. Strided rows without a real query
    contribute nothing, so a query block's scores sum to its number of real strided rows.
    """
    batch, heads, seq_len, head_dim = q.shape
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    n_blocks = -(-seq_len // block_size)
    padded, n_strided = n_blocks * block_size, n_blocks * block_size // stride
    valid = torch.zeros(batch, padded, dtype=torch.bool, device=q.device)
    valid[:, :seq_len] = left_padding_valid(kv_pad, batch, seq_len, q.device)
    group = heads // k.shape[1]
    qz = torch.zeros(batch, heads, padded, head_dim, dtype=torch.float64, device=q.device)
    kz = torch.zeros_like(qz)
    qz[:, :, :seq_len] = q.double()
    kz[:, :, :seq_len] = k.double().repeat_interleave(group, dim=1)
    qz, kz = qz * valid[:, None, :, None], kz * valid[:, None, :, None]
    antidiagonal = torch.zeros(batch, heads, n_strided, n_strided, dtype=torch.float64, device=q.device)
    for j in range(stride):
        antidiagonal += torch.einsum("bhrd,bhcd->bhrc", qz[:, :, stride - 1 - j::stride], kz[:, :, j::stride])
    real = valid.view(batch, n_strided, stride).any(dim=-1)
    r = torch.arange(n_strided, device=q.device)
    allowed = (r.view(1, 1, -1, 1) >= r.view(1, 1, 1, -1)) & real[:, None, None, :]
    logits = (antidiagonal * (scale / stride)).masked_fill(~allowed, float("-inf"))
    row_real = real[:, None, :, None]
    probs = torch.softmax(logits.masked_fill(~row_real, 0.0), dim=-1) * row_real
    per_block = block_size // stride
    return probs.view(batch, heads, n_blocks, per_block, n_blocks, per_block).sum(dim=(3, 5))


def xattn_select_reference(scores: torch.Tensor, kv_pad: torch.Tensor | None, block_size: int, seq_len: int,
                           threshold: float | None = None, density: float | None = None) -> torch.Tensor:
    """The blocks XAttention keeps, [B, H, NB, NB] bool, written out block row by block row.

    Candidates of query block i are the causal key blocks from the sample's first real block (the sink block) to
    i (the diagonal block); both of those are always kept. ``threshold``: then the other candidates in descending
    score, each added while the kept mass is still below threshold x the row's total. ``density`` (a fixed budget
    for benchmarks): ceil(density x candidates) blocks in all, the forced ones first, then by score. Query blocks
    without a real query keep nothing.
    """
    if (threshold is None) == (density is None):
        raise ValueError("give exactly one of threshold or density")
    batch, heads, n_blocks, _ = scores.shape
    pads = [0] * batch if kv_pad is None else [int(p) for p in kv_pad]
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    s64 = scores.double().cpu()
    for b in range(batch):
        first = pads[b] // block_size
        for qb in range(n_blocks):
            if qb * block_size + block_size - 1 < pads[b] or qb * block_size >= seq_len:
                continue
            candidates = list(range(first, qb + 1))
            forced = sorted({first, qb})
            for h in range(heads):
                row = s64[b, h, qb]
                rest = sorted((kb for kb in candidates if kb not in forced), key=lambda kb: -float(row[kb]))
                chosen = list(forced)
                if threshold is not None:
                    need = threshold * float(row[candidates].sum())
                    mass = float(row[forced].sum())
                    for kb in rest:
                        if mass >= need:
                            break
                        chosen.append(kb)
                        mass += float(row[kb])
                else:
                    budget = max(len(forced), min(len(candidates), math.ceil(density * len(candidates) - 1e-6)))
                    chosen += rest[:budget - len(forced)]
                keep[b, h, qb, chosen] = True
    return keep


def block_sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                                     block_size: int, kv_pad: torch.Tensor | None = None,
                                     scale: float | None = None) -> torch.Tensor:
    """Causal attention of a left-padded prompt restricted to kept (query block, key block) pairs, float64.

    keep [B, H, NB, NB] bool; a key is visible to a query iff it is real, causal and its block pair is kept.
    """
    batch, _, seq_len, _ = q.shape
    blocks = torch.arange(seq_len, device=q.device) // block_size
    pair = keep[:, :, blocks][:, :, :, blocks]
    causal = streaming_mask(seq_len, seq_len, kv_pad, 0, None, batch, q.device).unsqueeze(1)
    return masked_attention_reference(q, k, v, pair & causal, scale)
