"""Routed prefill: the prompt runs through every block once, with the plan (or router) deciding each layer per sample.

Layout: the batch is packed to the left, so sample b's tokens sit at indices [0, n_b) and index = real position.
Causal attention then never reaches a padding key from a real query, so every attention call is exact for the real
rows without masks, and the KV each layer produces is already in the cache's slot order.

Per layer:
  1. norm + K/V projection + rotary for every token, in token chunks, straight into a [B, Hkv, capacity, D] tensor
     that becomes the layer's cache if every sample keeps its full KV;
  2. the plan decides from the queries it reads (`Plan.query_positions`: the router's pooled spans, a few dozen
     positions; none for fixed plans), computed alone; one host read of the [B] decision picks the kernels;
  3. a layer where every sample takes a pattern whose queries only look back (streaming) runs by query chunk: norm
     + q projection + rotary of the chunk, the pattern's Triton kernel over the keys before it, output projection
     and MLP added into the residual stream in place. Chunk c's queries come from rows no earlier chunk has updated,
     so this equals the whole-layer computation, and the layer's full-length queries never exist;
  4. any other layer (FA rows, mixed rows, a pattern that reads the whole prompt, a plan that read every query)
     computes its queries in one buffer, attends in place over it (FA with SDPA's fastest backend, one query head
     at a time on long inputs), runs the output projection, and frees the buffer before the MLP. (Query chunks
     for FA, with SDPA's lower-right causal alignment, measured 40% slower TTFT at 128k on an H200.)
The residual add happens in the model dtype, as in the transformers block. Only the residual stream, the KV and, in
the layers of step 4, one query buffer are prompt-sized.
Only the logits the caller asks for are computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flux.attention.patterns import SparsePattern
from flux.engine.kv import KVCache
from flux.engine.ops import TorchOps
from flux.engine.parts import EngineError, ModelParts
from flux.plan import Plan

# Token budget of one chunk of the MLP: bounds its [chunk, 2 * intermediate] intermediate to about this many bytes.
# (Halving it to 64 MiB cost 30% of TTFT at 128k on an H200: cuBLAS runs the smaller GEMMs far less efficiently.)
CHUNK_BYTES = 128 * 2 ** 20
# Query rows of one step of the chunked attention: bounds its query buffer (and the attention output and the output
# projection's result, each the same size) to about this many bytes.
QUERY_CHUNK_BYTES = 128 * 2 ** 20
# Tokens of one step of the q/k/v projection: bounds its temporaries (the normed input and the fused q/k/v output)
# to about this many bytes. They sit at the prefill's memory peak next to the residual stream and the queries, and
# at 128 MiB of queries they were 0.25 GiB of it (experiments/speed/h200_engine_v3); 4k-token GEMMs still run at
# full speed.
PROJECT_CHUNK_BYTES = 64 * 2 ** 20
# From this many query tokens in a layer (batch x length), FA attention runs one query head at a time and writes
# each head's output over its own queries, so a full-length output buffer never exists next to the queries.
HEADWISE_FA_TOKENS = 65536
# Query rows per call of a sparse kernel; keeps each call's output buffer small.
SA_QUERY_CHUNK = 16384


@dataclass
class Packed:
    """A batch packed to the left. `lengths` [B] on the device, `lengths_host` the same as ints; `valid` [B, T] or
    None when no sample is shorter than T; `segments` (router spans) in packed coordinates."""

    ids: torch.Tensor
    lengths: torch.Tensor
    lengths_host: list[int]
    valid: torch.Tensor | None
    segments: dict[str, torch.Tensor] | None

    @property
    def batch(self) -> int:
        return self.ids.shape[0]

    @property
    def length(self) -> int:
        return self.ids.shape[1]


def chunk_tokens(parts: ModelParts, batch: int, dtype: torch.dtype) -> int:
    """Tokens per sample in one chunk: the MLP intermediate of B x chunk tokens stays under CHUNK_BYTES."""
    per_token = 2 * parts.intermediate * torch.empty((), dtype=dtype).element_size()
    return max(64, CHUNK_BYTES // (per_token * batch))


def query_chunk_tokens(parts: ModelParts, batch: int, dtype: torch.dtype) -> int:
    """Query rows per sample in one step of the chunked attention (a multiple of 256, the kernels' tile)."""
    per_token = parts.n_q * parts.head_dim * torch.empty((), dtype=dtype).element_size()
    return max(256, QUERY_CHUNK_BYTES // (per_token * batch) // 256 * 256)


def dense_attention_inplace(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> None:
    """Causal attention of q [B, H, T, D] over k/v [B, Hkv, T, D], written over q. Exact for packed batches."""
    b, h, t, _ = q.shape
    if b * t < HEADWISE_FA_TOKENS:
        q.copy_(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                               enable_gqa=h != k.shape[1]))
        return
    group = h // k.shape[1]
    for head in range(h):
        kv = head // group
        q[:, head:head + 1] = F.scaled_dot_product_attention(q[:, head:head + 1].contiguous(), k[:, kv:kv + 1],
                                                             v[:, kv:kv + 1], is_causal=True, scale=scale)


def sparse_attention_inplace(pattern: SparsePattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             lengths: list[int], scale: float, ops: TorchOps) -> None:
    """The pattern's prefill attention of the packed rows q [B, H, T, D] over k/v [B, Hkv, T, D], written over q.

    A pattern whose queries only look back (`chunkable_queries`, e.g. streaming) runs in query chunks: chunk c only
    reads its own queries, so it overwrites them once done and no second full-size buffer exists; rows shorter than
    T need nothing special, because their padding sits after their last query. A pattern that reads the whole
    prompt (triangle's last queries, XAttention's block scores) gets each sample's prompt exactly as that sample
    alone would give it: one call for the batch when every row is full, else one call per row on its real tokens."""
    t = q.shape[2]
    if pattern.chunkable_queries:
        for s in range(0, t, SA_QUERY_CHUNK):
            e = min(t, s + SA_QUERY_CHUNK)
            q[:, :, s:e] = pattern.prefill_rows(q[:, :, s:e], k[:, :, :e], v[:, :, :e], scale, backend=ops.name)
        return
    if all(n == t for n in lengths):
        q.copy_(pattern.prefill(q, k, v, None, scale, backend=ops.name))
        return
    for b, n in enumerate(lengths):
        q[b:b + 1, :, :n] = pattern.prefill(q[b:b + 1, :, :n], k[b:b + 1, :, :n], v[b:b + 1, :, :n], None, scale,
                                            backend=ops.name)


def layer_attention(pattern: SparsePattern, ops: TorchOps, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    sa: list[bool], lengths: list[int], scale: float) -> None:
    """Attention for one layer with per-sample decisions `sa`, written over q (rows split when they disagree)."""
    if all(sa):
        sparse_attention_inplace(pattern, q, k, v, lengths, scale, ops)
        return
    if not any(sa):
        dense_attention_inplace(q, k, v, scale)
        return
    for rows, run in (([b for b, s in enumerate(sa) if s], "sa"), ([b for b, s in enumerate(sa) if not s], "fa")):
        idx = torch.tensor(rows, device=q.device)
        qr, kr, vr = q.index_select(0, idx), k.index_select(0, idx), v.index_select(0, idx)
        if run == "sa":
            sparse_attention_inplace(pattern, qr, kr, vr, [lengths[b] for b in rows], scale, ops)
        else:
            dense_attention_inplace(qr, kr, vr, scale)
        q[idx] = qr


def host_decisions(sa: torch.Tensor, uniform: bool | None) -> list[bool]:
    """The one host read of a layer's decision (none when the plan already knows every sample agrees)."""
    if uniform is not None:
        return [bool(uniform)] * sa.shape[0]
    return [bool(x) for x in sa.tolist()]


def project_chunk_tokens(parts: ModelParts, batch: int, dtype: torch.dtype) -> int:
    """Tokens per sample in one step of the q/k/v projection (its normed input plus its fused output)."""
    width = parts.hidden + (parts.n_q + 2 * parts.n_kv) * parts.head_dim
    per_token = width * torch.empty((), dtype=dtype).element_size()
    return max(256, PROJECT_CHUNK_BYTES // (per_token * batch) // 256 * 256)


def new_queries(b: int, t: int, parts: ModelParts, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised query tensor [B, H, T, D] laid out as [B, T, H, D], so `.transpose(1, 2).reshape(B, T,
    H * D)` (the output projection's input, once attention wrote over it) is free."""
    return torch.empty(b, t, parts.n_q, parts.head_dim, dtype=dtype, device=device).transpose(1, 2)


def project_in_chunks(parts: ModelParts, ops: TorchOps, blk, r: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      chunk: int, q: torch.Tensor | None, k: torch.Tensor | None, v: torch.Tensor | None) -> None:
    """norm + projection + rotary of every token of the layer input r, chunk by chunk, into q and/or k/v."""
    b, t = r.shape[:2]
    for s in range(0, t, chunk):
        e = min(t, s + chunk)
        hn = ops.norm(blk.in_norm, r[:, s:e])
        ops.project_rope(parts, blk, hn, cos[:, s:e].expand(b, -1, -1), sin[:, s:e].expand(b, -1, -1),
                         None if q is None else q[:, :, s:e], None if k is None else k[:, :, s:e],
                         None if v is None else v[:, :, s:e])


def probe_queries(parts: ModelParts, ops: TorchOps, blk, r: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  index: torch.Tensor) -> torch.Tensor:
    """The layer's post-rotary queries at positions `index` [B, K] only: [B, H, K, D]."""
    b, k = index.shape
    q = new_queries(b, k, parts, r.dtype, r.device)
    if k:
        rows = r.gather(1, index[:, :, None].expand(-1, -1, r.shape[-1]))
        ops.project_rope(parts, blk, ops.norm(blk.in_norm, rows), cos[0][index], sin[0][index], q, None, None)
    return q


def add_mlp(ops: TorchOps, blk, r: torch.Tensor, start: int, end: int, chunk: int) -> None:
    """r[:, start:end] += MLP(post_norm(r[:, start:end])), in chunks."""
    for s in range(start, end, chunk):
        e = min(end, s + chunk)
        r[:, s:e] += ops.mlp(blk, ops.norm(blk.post_norm, r[:, s:e]))


@torch.no_grad()
def prefill(parts: ModelParts, ops: TorchOps, pattern: SparsePattern, plan: Plan, packed: Packed,
            logit_index: torch.Tensor, cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the packed prompt through every layer. Returns (logits [B, K, V] float32 at `logit_index` [B, K]
    (packed positions), decisions [B, L] bool, True = SA). With `cache`, every layer's KV is added to it."""
    b, t = packed.ids.shape
    device = packed.ids.device
    x = parts.embed(packed.ids)
    dtype = x.dtype
    d, h = parts.head_dim, parts.n_q
    capacity = cache.capacity if cache is not None else t
    if capacity < t:
        raise EngineError(f"KV capacity {capacity} is shorter than the prompt ({t} tokens)")
    pos = torch.arange(t, device=device)[None, :]
    cos, sin = parts.rotary(x[:1, :1], pos)
    chunk = chunk_tokens(parts, b, dtype)
    q_step = query_chunk_tokens(parts, b, dtype)
    p_step = project_chunk_tokens(parts, b, dtype)
    keep_policy = pattern.kv_policy() is not None
    if hasattr(plan, "begin_forward"):
        plan.begin_forward(packed.valid)
    probe = plan.query_positions(b, t, packed.segments, device)
    decisions = torch.zeros(b, parts.num_layers, dtype=torch.bool, device=device)
    r = x  # the residual stream, updated in place
    for layer, blk in enumerate(parts.blocks):
        k_full = torch.empty(b, parts.n_kv, capacity, d, dtype=dtype, device=device)
        v_full = torch.empty_like(k_full)
        # slots past the prompt are written by decode before any query reads them, but the torch decode path
        # multiplies masked slots by zero weights, so they must hold finite values
        k_full[:, :, t:].zero_()
        v_full[:, :, t:].zero_()
        q = None
        if probe is None:  # the plan reads every query: the layer's queries are computed in one buffer
            q = new_queries(b, t, parts, dtype, device)
            project_in_chunks(parts, ops, blk, r, cos, sin, p_step, q, k_full, v_full)
            decision = plan.decide(layer, q, packed.segments)
        else:
            project_in_chunks(parts, ops, blk, r, cos, sin, p_step, None, k_full, v_full)
            decision = plan.decide(layer, probe_queries(parts, ops, blk, r, cos, sin, probe), packed.segments)
        if decision.gate is not None:
            raise EngineError("this plan mixes FA and SA outputs with soft gates, which only the training forward "
                              "computes; give hard decisions (a bool tensor, a list, 'dense'/'sparse', or a router "
                              "in eval mode)")
        sa = host_decisions(decision.sa, decision.uniform)
        decisions[:, layer] = decision.sa.to(device)
        keys, values = k_full[:, :, :t], v_full[:, :, :t]
        if q is None and not (all(sa) and pattern.chunkable_queries):
            q = new_queries(b, t, parts, dtype, device)
            project_in_chunks(parts, ops, blk, r, cos, sin, p_step, q, None, None)
        if q is not None:
            layer_attention(pattern, ops, q, keys, values, sa, packed.lengths_host, parts.scale)
            q_rows = q.transpose(1, 2)
            for s in range(0, t, chunk):
                e = min(t, s + chunk)
                r[:, s:e] += blk.o_proj(q_rows[:, s:e].reshape(b, e - s, h * d))
            del q, q_rows
            add_mlp(ops, blk, r, 0, t, chunk)
        else:
            for s in range(0, t, q_step):
                e = min(t, s + q_step)
                qc = new_queries(b, e - s, parts, dtype, device)
                project_in_chunks(parts, ops, blk, r[:, s:e], cos[:, s:e], sin[:, s:e], p_step, qc, None, None)
                qc.copy_(pattern.prefill_rows(qc, keys[:, :, :e], values[:, :, :e], parts.scale, backend=ops.name))
                r[:, s:e] += blk.o_proj(qc.transpose(1, 2).reshape(b, e - s, h * d))
                del qc
                add_mlp(ops, blk, r, s, e, chunk)
        del keys, values
        if cache is not None:
            cache.add_layer((k_full, v_full), [not s or not keep_policy for s in sa], packed.lengths)
        del k_full, v_full
    return final_logits(parts, ops, r, logit_index), decisions


def final_logits(parts: ModelParts, ops: TorchOps, r: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Final norm + LM head at packed positions `index` [B, K] only, in chunks of positions: [B, K, V] float32."""
    b, k = index.shape
    out = torch.empty(b, k, parts.vocab, dtype=torch.float32, device=r.device)
    step = max(1, (64 * 2 ** 20) // (4 * parts.vocab * b))
    for s in range(0, k, step):
        e = min(k, s + step)
        rows = r.gather(1, index[:, s:e, None].expand(-1, -1, r.shape[-1]))
        out[:, s:e] = parts.lm_head(ops.norm(parts.final_norm, rows)).float()
    return out
