"""Which key blocks each query block attends, from XAttention block scores (torch; runs on any device).

Why separate from the kernels: selection is a sort and a cumulative sum per block row, small next to scoring and
attention ([B, H, NB, NB] with NB = T / block_size), and torch's sort is already fast on the GPU. The rule matches
``flux_kernels.reference.xattn_select_reference``: the sink block (the sample's first real block) and the diagonal
block are always kept; then either the highest-scoring others until the kept mass reaches ``threshold`` x the
row's total (XAttention), or a fixed ``density`` of the causal blocks (benchmarks: random weights give near-uniform
scores, so a threshold would keep almost everything).
"""

from __future__ import annotations

import torch


def block_layout(valid: torch.Tensor | None, batch: int, seq_len: int, block_size: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(candidates, forced) [B, 1, NB, NB] bool and the sink block [B] of a prompt whose real tokens are ``valid``.

    Candidates of query block i: key blocks from the sink block to i, for query blocks holding a real token.
    """
    n_blocks = -(-seq_len // block_size)
    real = torch.zeros(batch, n_blocks * block_size, dtype=torch.bool, device=device)
    real[:, :seq_len] = True if valid is None else valid
    query_ok = real.view(batch, n_blocks, block_size).any(dim=-1)
    sink = real.to(torch.int8).argmax(dim=-1) // block_size
    qb = torch.arange(n_blocks, device=device).view(1, -1, 1)
    kb = torch.arange(n_blocks, device=device).view(1, 1, -1)
    first = sink.view(batch, 1, 1)
    candidates = (kb <= qb) & (kb >= first) & query_ok.view(batch, n_blocks, 1)
    forced = candidates & ((kb == first) | (kb == qb))
    return candidates[:, None], forced[:, None], sink


def check_selection_args(threshold: float | None, density: float | None) -> None:
    if (threshold is None) == (density is None):
        raise ValueError(f"give exactly one of threshold or density (got threshold={threshold}, density={density})")
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold={threshold} must lie in (0, 1] (XAttention uses 0.9)")
    if density is not None and not 0.0 < density <= 1.0:
        raise ValueError(f"density={density} must lie in (0, 1] (fraction of causal blocks kept, e.g. 0.1)")


def select_blocks(scores: torch.Tensor, valid: torch.Tensor | None, block_size: int, seq_len: int,
                  threshold: float | None = None, density: float | None = None) -> torch.Tensor:
    """Kept blocks [B, H, NB, NB] bool from block scores [B, H, NB, NB]; ``valid`` [B, T] marks real tokens."""
    check_selection_args(threshold, density)
    batch, _, n_blocks, _ = scores.shape
    candidates, forced, _ = block_layout(valid, batch, seq_len, block_size, scores.device)
    s = scores.double()
    # sort key: the other candidates by score (>= 0), then forced blocks (-1), then non-candidates (-2)
    key = torch.where(forced, -1.0, torch.where(candidates, s, -2.0))
    values, order = key.sort(dim=-1, descending=True)
    rest = values >= 0
    if threshold is not None:
        total = (s * candidates).sum(dim=-1, keepdim=True)
        kept = (s * forced).sum(dim=-1, keepdim=True)
        gain = values.clamp_min(0.0)
        before = kept + gain.cumsum(dim=-1) - gain  # mass kept before adding each block
        take = rest & (before < threshold * total)
    else:
        n_cand = candidates.sum(dim=-1, keepdim=True)
        n_forced = forced.sum(dim=-1, keepdim=True)
        budget = torch.ceil(density * n_cand - 1e-6).long().clamp(min=n_forced, max=n_cand) - n_forced
        take = rest & (torch.arange(n_blocks, device=scores.device) < budget)
    return forced | torch.zeros_like(take).scatter(-1, order, take)


def block_lists(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_blocks [B, H, NB, NB] int32, counts [B, H, NB] int32): each row's kept key blocks first, ascending."""
    counts = keep.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)
    return order.to(torch.int32).contiguous(), counts.contiguous()


def block_density(keep: torch.Tensor, valid: torch.Tensor | None, block_size: int, seq_len: int) -> float:
    """Kept blocks / causal candidate blocks, over every sample, head and real query block."""
    candidates, _, _ = block_layout(valid, keep.shape[0], seq_len, block_size, keep.device)
    n_cand = candidates.sum() * keep.shape[1]
    return float((keep & candidates).sum()) / float(n_cand) if int(n_cand) else 0.0
