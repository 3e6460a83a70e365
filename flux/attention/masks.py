"""Dense boolean masks from real-token positions: the exact definition every attention backend is tested against."""

from __future__ import annotations

import torch


def position_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, k_valid: torch.Tensor | None,
                  rule: torch.Tensor | None = None, sa_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Mask [B, 1 or H, Tq, Tk]: causal in real positions, padding keys removed, and a sparse pattern's `rule`
    ([B, 1 or H, Tq, Tk] bool, from `SparsePattern.row_rule`) where SA applies.

    `sa_rows` ([B] bool) applies the rule only to those samples, so a batch that mixes FA and SA samples in one
    layer is served by one masked call. Query rows that would see nothing (padding queries) are opened to every key
    so softmax stays finite; their outputs are never read, but a NaN there would leak through 0 * NaN later.
    """
    qp = q_pos[:, None, :, None]
    kp = k_pos[:, None, None, :]
    mask = kp <= qp
    if k_valid is not None:
        mask = mask & k_valid[:, None, None, :]
    if rule is not None:
        if sa_rows is not None:
            rule = rule | ~sa_rows.to(rule.device)[:, None, None, None]  # decisions may live on the host
        mask = mask & rule
    return mask | ~mask.any(dim=-1, keepdim=True)
