"""The decode step over the engine's KV cache, written so one step can be captured in a CUDA graph and replayed.

Every buffer is allocated before the first step and every counter lives on the device: the step reads the token and
real position of each sample, appends its K/V (full cache: slot = position; ring: the slot that just left the
window), attends, samples the next token, records it and advances the counters in place. A layer whose samples all
use one cache runs one attention call; in a layer whose samples disagree, each row writes and reads its own cache
(full or ring) within the same single launch of the split-KV kernel, without gathers.
Finished samples keep stepping (their tokens are replaced by the pad id), so the graph never changes shape; the host
only looks at the device every few steps to see whether everyone is done.
"""

from __future__ import annotations

import torch

from flux.engine.kv import KVCache, ring_slot
from flux.engine.ops import TorchOps
from flux.engine.parts import ModelParts
from flux.engine.sampling import Sampler


class Decoder:
    """Decode state for one generate call: prefill's first token, the cache, the sampler and the stop ids."""

    def __init__(self, parts: ModelParts, ops: TorchOps, cache: KVCache, lengths: torch.Tensor,
                 first: torch.Tensor, max_new_tokens: int, sampler: Sampler, eos_ids: list[int], pad_id: int) -> None:
        self.parts, self.ops, self.cache, self.sampler = parts, ops, cache, sampler
        b, dev = first.shape[0], first.device
        self.batch, self.max_new = b, max_new_tokens
        self.pad_id = pad_id
        self.eos = torch.tensor(eos_ids or [-1], dtype=torch.long, device=dev)
        self.tok = first.clone()
        self.pos = lengths.clone().long()  # real position of the token the next step feeds
        self.step_idx = torch.ones(1, dtype=torch.long, device=dev)
        self.out = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=dev)
        self.out[:, 0] = first
        self.done = self._is_eos(first)
        self.stop_at = [max_new_tokens] * b  # set by the host when a stop string ends a sample
        dtype = cache.dtype
        self.q = torch.empty(b, parts.n_q, 1, parts.head_dim, dtype=dtype, device=dev)
        # rotary angles of every position the call can reach, read by index each step (one gather instead of
        # recomputing them: the same values, fewer kernels per step)
        cos, sin = parts.rotary(self.q[:1, 0], torch.arange(cache.capacity, device=dev)[None, :])
        self.cos_table, self.sin_table = cos[0], sin[0]
        self.plans, self.rows = [], []
        for layer in cache.layers:
            n_full, n_ring = layer.full_rows.numel(), layer.ring_rows.numel()
            self.plans.append((
                ops.decode_plan(b if n_ring else n_full, parts.n_kv, cache.capacity, dev, dtype) if n_full else None,
                ops.decode_plan(n_ring, parts.n_kv, cache.ring_size, dev, dtype, ring=True) if n_ring else None))
            row_ring = torch.zeros(b, dtype=torch.int32, device=dev)
            row_local = torch.zeros(b, dtype=torch.int32, device=dev)
            row_ring[layer.ring_rows] = 1
            row_local[layer.full_rows] = torch.arange(n_full, dtype=torch.int32, device=dev)
            row_local[layer.ring_rows] = torch.arange(n_ring, dtype=torch.int32, device=dev)
            self.rows.append((row_ring, row_local))
        self._graph: torch.cuda.CUDAGraph | None = None

    def _is_eos(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens[:, None] == self.eos[None, :]).any(dim=-1)

    @property
    def steps_done(self) -> int:
        return int(self.step_idx.item())

    def _attend(self, layer_idx: int, slot_full: torch.Tensor, end_full: torch.Tensor, slot_ring: torch.Tensor,
                end_ring: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        parts, ops, kv = self.parts, self.ops, self.cache.layers[layer_idx]
        blk = parts.blocks[layer_idx]
        plan_full, plan_ring = self.plans[layer_idx]
        if kv.all_full:
            ops.project_rope(parts, blk, h, cos, sin, self.q, kv.full_k, kv.full_v, slot_full)
            return ops.decode_attention(self.q, kv.full_k, kv.full_v, end_full, parts.scale, plan_full)
        if kv.all_ring:
            ops.project_rope(parts, blk, h, cos, sin, self.q, kv.ring_k, kv.ring_v, slot_ring)
            return ops.decode_attention(self.q, kv.ring_k, kv.ring_v, end_ring, parts.scale, plan_ring)
        # samples disagree: each row writes and reads its own cache (one launch each, no gathers)
        row_ring, row_local = self.rows[layer_idx]
        ops.project_rope(parts, blk, h, cos, sin, self.q, kv.full_k, kv.full_v, slot_full,
                         ring=(kv.ring_k, kv.ring_v, row_ring, row_local, slot_ring))
        return ops.decode_attention(self.q, kv.full_k, kv.full_v, end_full, parts.scale, plan_full,
                                    ring=(kv.ring_k, kv.ring_v, row_ring, row_local, end_ring))

    @torch.no_grad()
    def step(self) -> None:
        """One token for every sample, on device state only (capturable)."""
        parts, ops, b = self.parts, self.ops, self.batch
        x = parts.embed(self.tok.view(b, 1))
        cos, sin = self.cos_table[self.pos][:, None], self.sin_table[self.pos][:, None]
        slot_full = self.pos
        end_full = (self.pos + 1).to(torch.int32)
        slot_ring = ring_slot(self.pos, self.cache.sink, self.cache.window)
        end_ring = end_full.clamp(max=self.cache.ring_size)
        r = x
        h = ops.norm(parts.blocks[0].in_norm, r)
        for i, blk in enumerate(parts.blocks):
            attn = self._attend(i, slot_full, end_full, slot_ring, end_ring, cos, sin, h)
            h, r = ops.add_norm(blk.o_proj(attn.reshape(b, 1, -1)), r, blk.post_norm)
            following = parts.blocks[i + 1].in_norm if i + 1 < len(parts.blocks) else parts.final_norm
            h, r = ops.add_norm(ops.mlp(blk, h), r, following)
        logits = parts.lm_head(h[:, 0])
        # greedy takes the argmax of the model-dtype logits (the same token as after an upcast)
        nxt = self.sampler(logits.float() if self.sampler.do_sample else logits, self.step_idx)
        nxt = torch.where(self.done, torch.full_like(nxt, self.pad_id), nxt)
        self.out.index_copy_(1, self.step_idx, nxt[:, None])
        self.done |= self._is_eos(nxt)
        self.tok.copy_(nxt)
        self.pos.add_(1)
        self.step_idx.add_(1)

    def capture(self) -> None:
        """Capture `step` in a CUDA graph. A warm-up step on a side stream compiles the kernels first; its cache
        writes land in the slots the first replay overwrites, and the counters it moved are put back."""
        state = (self.tok, self.pos, self.step_idx, self.done)
        saved = [t.clone() for t in state]
        stream = torch.cuda.Stream(self.tok.device)
        stream.wait_stream(torch.cuda.current_stream(self.tok.device))
        with torch.cuda.stream(stream):
            self.step()
        torch.cuda.current_stream(self.tok.device).wait_stream(stream)
        for dst, src in zip(state, saved):
            dst.copy_(src)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step()
        for dst, src in zip(state, saved):
            dst.copy_(src)
        self._graph = graph

    def run(self, steps: int, use_graph: bool) -> None:
        """`steps` more decode steps (graph replays when `use_graph`, capturing on first use)."""
        if use_graph and self._graph is None:
            self.capture()
        for _ in range(steps):
            if use_graph:
                self._graph.replay()
            else:
                self.step()
