"""The engine's KV cache: per layer, each sample keeps either its full KV or only what its sparse pattern can see.

Every layer holds two rectangular caches with one row per sample that uses them:
  * `full` [n_full, Hkv, capacity, D]: samples that attend every key in decode (routed to FA, or to a pattern that
    keeps the full KV). Slot = real-token position, so a sample's keys are slots [0, length).
  * `ring` [n_ring, Hkv, sink + window, D]: samples routed to a sink + window pattern. Real position p lives at
    slot p when p < sink, else at sink + (p - sink) % window, so the slots in use are always [0, min(n, sink +
    window)) and a decode step overwrites exactly the key that just left the window. Every key the ring holds is
    visible to the next query, so decode reads it as one range, like the full cache.
A sample routed to SA in a layer therefore holds sink + window there even when its batch-mates chose FA: the memory
saved is exactly its own sparsity. Both caches are sized once per generate call (capacity = longest prompt + new
tokens), which is what lets the decode step be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerKV:
    """One layer's caches. `full_rows`/`ring_rows` are the batch rows each cache serves (device tensors, in batch
    order); `all_full`/`all_ring` mark layers where one cache serves every row, so decode needs no gather."""

    full_rows: torch.Tensor
    ring_rows: torch.Tensor
    full_k: torch.Tensor | None
    full_v: torch.Tensor | None
    ring_k: torch.Tensor | None
    ring_v: torch.Tensor | None
    all_full: bool
    all_ring: bool

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.full_k, self.full_v, self.ring_k, self.ring_v)
                   if t is not None)


def ring_slot(pos: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """Ring slot of real position `pos` (any shape)."""
    return torch.where(pos < sink, pos, sink + (pos - sink).remainder(window))


def ring_fill_positions(lengths: torch.Tensor, sink: int, window: int, size: int) -> torch.Tensor:
    """[n, size] real position each ring slot holds after a prompt of `lengths` [n] tokens (-1 = empty slot)."""
    s = torch.arange(size, device=lengths.device)[None, :]
    n = lengths[:, None]
    r = s - sink
    latest = sink + r + window * torch.div(n - 1 - sink - r, window, rounding_mode="floor")
    pos = torch.where(s < sink, s, latest)
    ok = (pos >= 0) & (pos < n) & ((s < sink) | (latest >= sink))
    return torch.where(ok, pos, -1)


class KVCache:
    """All layers' caches for one batch, plus the accounting GenerationResult reports."""

    def __init__(self, batch: int, capacity: int, sink: int, window: int, n_kv: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.batch, self.capacity = batch, capacity
        self.sink, self.window = sink, window
        self.ring_size = min(sink + window, capacity)
        self.n_kv, self.head_dim, self.dtype, self.device = n_kv, head_dim, dtype, device
        self.layers: list[LayerKV] = []
        self.row_full: list[list[bool]] = []  # [layer][row]: row keeps its full KV in this layer

    def token_bytes(self) -> int:
        """Bytes of K and V for one token of one sample in one layer."""
        return 2 * self.n_kv * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def add_layer(self, full_kv: tuple[torch.Tensor, torch.Tensor], keep_full: list[bool],
                  lengths: torch.Tensor) -> None:
        """Register the next layer from its prefill KV `full_kv` ([B, Hkv, capacity, D] each, slot = position):
        rows with keep_full[b] keep it, the others keep their sink + ring only. The full tensor is reused as the
        layer's cache when every row keeps it, so an all-FA layer costs no copy."""
        k, v = full_kv
        rows_full = [b for b, f in enumerate(keep_full) if f]
        rows_ring = [b for b, f in enumerate(keep_full) if not f]
        dev = self.device
        full_idx = torch.tensor(rows_full, dtype=torch.long, device=dev)
        ring_idx = torch.tensor(rows_ring, dtype=torch.long, device=dev)
        full_k = full_v = ring_k = ring_v = None
        if rows_ring:
            pos = ring_fill_positions(lengths[ring_idx], self.sink, self.window, self.ring_size)
            idx = pos.clamp(min=0)[:, None, :, None].expand(-1, self.n_kv, -1, self.head_dim)
            src_k = k if len(rows_ring) == self.batch else k.index_select(0, ring_idx)
            src_v = v if len(rows_ring) == self.batch else v.index_select(0, ring_idx)
            ring_k, ring_v = src_k.gather(2, idx), src_v.gather(2, idx)
        if rows_full:
            full_k = k if not rows_ring else k.index_select(0, full_idx)
            full_v = v if not rows_ring else v.index_select(0, full_idx)
        self.layers.append(LayerKV(full_idx, ring_idx, full_k, full_v, ring_k, ring_v,
                                   all_full=not rows_ring, all_ring=not rows_full))
        self.row_full.append(list(keep_full))

    def expand(self, copies: int) -> None:
        """Repeat every sample's caches `copies` times (sample-major: rows b*copies ... b*copies + copies - 1), so
        several continuations of one prompt share its prefill."""
        if copies == 1:
            return
        for i, layer in enumerate(self.layers):
            rep = (lambda t: None if t is None else t.repeat_interleave(copies, dim=0))
            layer.full_k, layer.full_v = rep(layer.full_k), rep(layer.full_v)
            layer.ring_k, layer.ring_v = rep(layer.ring_k), rep(layer.ring_v)
            offsets = torch.arange(copies, device=self.device)
            layer.full_rows = (layer.full_rows[:, None] * copies + offsets).flatten()
            layer.ring_rows = (layer.ring_rows[:, None] * copies + offsets).flatten()
            self.row_full[i] = [f for f in self.row_full[i] for _ in range(copies)]
        self.batch *= copies

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def nbytes_dense(self) -> int:
        """What the same batch and capacity would hold with every layer full."""
        return len(self.layers) * self.batch * self.capacity * self.token_bytes()

    def nbytes_per_sample(self) -> list[int]:
        per_token = self.token_bytes()
        return [sum(self.capacity if layer[b] else self.ring_size for layer in self.row_full) * per_token
                for b in range(self.batch)]
