"""The attention function flux registers with transformers' AttentionInterface: the differentiable training path.

`FluxModel.forward` with gradients (router training, soft gate plans) runs the backbone's own modules; each attention
module calls this function with its `layer_idx`, and the routing state arrives as the forward keyword argument
`flux_state` (transformers passes extra keyword arguments down to registered attention functions). Gradient
checkpointing re-runs a layer with the same keyword arguments, so a recomputation is routed exactly as the forward
was. Inference never comes here: it runs on flux's engine (flux.engine), which keeps decisions and KV per sample.
A plain call of the wrapped model (`fm.model(...)`, `fm.model.generate(...)`) carries no state and gets a clear
error instead of silently running some other routing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.modeling_utils import AttentionInterface

from flux.attention.backends import dense_mask_too_big, full_attention, sparse_attention
from flux.attention.patterns import SparsePattern
from flux.plan import LayerDecision, Plan

ATTENTION_NAME = "flux"
STATE_KWARG = "flux_state"


@dataclass
class RoutingState:
    """Everything the dispatcher needs for one training forward call."""

    plan: Plan
    pattern: SparsePattern
    fa_backend: str
    sa_backend: str
    q_pos: torch.Tensor
    valid: torch.Tensor | None
    segments: dict[str, torch.Tensor] | None = None
    decisions: dict[int, torch.Tensor] = field(default_factory=dict)
    gates: dict[int, torch.Tensor] = field(default_factory=dict)
    masks: dict = field(default_factory=dict)
    # positions and validity of sample subsets, kept for the whole forward: `masks` memoises by tensor identity,
    # so the tensors it keys on must outlive every layer that uses them
    subsets: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(q_pos, valid) of the samples `index`; valid is None when none of them is padded."""
        key = tuple(index.tolist())
        if key not in self.subsets:
            valid = None if self.valid is None else self.valid[index]
            if valid is not None and bool(valid.all()):
                valid = None
            self.subsets[key] = (self.q_pos[index], valid)
        return self.subsets[key]


def attach(model: torch.nn.Module) -> int:
    """Count the attention modules (anything with a `layer_idx` and a `q_proj`) the dispatcher will serve."""
    return sum(1 for module in model.modules() if hasattr(module, "layer_idx") and hasattr(module, "q_proj"))


def branch(kind: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, state: RoutingState,
           scaling: float, index: torch.Tensor | None = None, grad: bool = True) -> torch.Tensor:
    """One branch ("fa" or "sa") for every sample, or for the samples `index`; `grad=False` runs it without
    building a graph (a branch whose every gradient would be zero)."""
    q_pos, valid = state.q_pos, state.valid
    if index is not None:
        query, key, value = query[index], key[index], value[index]
        q_pos, valid = state.rows(index)
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        if kind == "fa":
            return full_attention(query, key, value, q_pos, q_pos, valid, scaling, state.fa_backend, state.masks)
        return sparse_attention(query, key, value, q_pos, q_pos, valid, state.pattern, scaling, state.sa_backend,
                                None, state.masks)


def by_rows(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Reassemble per-group outputs [(sample indices, output of those samples)] into batch order (differentiable)."""
    order = torch.cat([index for index, _ in parts])
    return torch.cat([out for _, out in parts])[order.argsort()]


def hard_gates(z: torch.Tensor) -> torch.Tensor | None:
    """[B] bool, True where FA was chosen, when every gate is exactly 0 or 1 (straight-through samples); None for
    soft gates."""
    return z == 1 if bool(((z == 0) | (z == 1)).all()) else None


def gated_mix(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, gate: torch.Tensor, state: RoutingState,
              scaling: float) -> torch.Tensor:
    """out = z·FA + (1 − z)·SA per sample, with z the FA gate [B].

    Soft gates (z strictly inside (0, 1)) need both branches with their gradients. A straight-through gate is hard
    in the forward, z = hard − soft.detach() + soft ∈ {0, 1} exactly (1 − s + s is exact for s ≥ 1/2, the only case
    where the hard value is 1), so the forward value is the chosen branch alone. Its gradient is not: d out / d z =
    FA − SA reads both branches' values, so both branches still run forward for every sample, and the router keeps
    exactly the gradient it trains on. What the hard gate saves is the backward of the branch it did not choose:
    that branch's coefficient is exactly 0, so every gradient through it is exactly 0, and it runs without a graph
    (no activations saved for it, no backward kernel: skipping FA's backward, the costliest kernel of a long-context
    step, on every layer routed to SA). Its output is still saved, as the value the gate's gradient needs. Gradients
    are the same as those of the plain mix of two differentiable branches (the skipped terms are exact zeros)."""
    z = gate.to(query.dtype)

    def mix(rows: torch.Tensor | None, fa_grad: bool, sa_grad: bool) -> torch.Tensor:
        fa = branch("fa", query, key, value, state, scaling, rows, grad=fa_grad)
        sa = branch("sa", query, key, value, state, scaling, rows, grad=sa_grad)
        zb = (z if rows is None else z[rows])[:, None, None, None]
        return zb * fa + (1 - zb) * sa

    chose_fa = hard_gates(gate)
    if chose_fa is None:
        return mix(None, True, True)
    all_fa, any_fa = bool(chose_fa.all()), bool(chose_fa.any())
    if all_fa or not any_fa:
        return mix(None, all_fa, not all_fa)
    return by_rows([(rows, mix(rows, fa_chosen, not fa_chosen))
                    for rows, fa_chosen in ((chose_fa.nonzero()[:, 0], True), ((~chose_fa).nonzero()[:, 0], False))])


def run_branches(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, decision: LayerDecision,
                 state: RoutingState, scaling: float) -> torch.Tensor:
    """Run only the branch(es) the decision needs; a gate (soft or straight-through) mixes both (see gated_mix).
    A hard decision that differs across samples is one masked call on short inputs, and at lengths where a dense
    mask does not fit two calls, FA on its samples and SA on the others."""
    if decision.gate is not None:
        return gated_mix(query, key, value, decision.gate, state, scaling)
    uniform = decision.uniform
    if uniform is None:
        uniform = True if bool(decision.sa.all()) else (False if not bool(decision.sa.any()) else None)
    if uniform is True:
        return branch("sa", query, key, value, state, scaling)
    if uniform is False:
        return branch("fa", query, key, value, state, scaling)
    sa_rows = decision.sa.to(query.device)
    if dense_mask_too_big(query.shape[2], key.shape[2]):
        return by_rows([(rows, branch(kind, query, key, value, state, scaling, rows))
                        for rows, kind in ((sa_rows.nonzero()[:, 0], "sa"), ((~sa_rows).nonzero()[:, 0], "fa"))])
    return sparse_attention(query, key, value, state.q_pos, state.q_pos, state.valid, state.pattern, scaling,
                            state.sa_backend, sa_rows, state.masks)


def flux_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           **kwargs) -> tuple[torch.Tensor, None]:
    state = kwargs.get(STATE_KWARG)
    if state is None:
        raise RuntimeError("this model's attention is routed by flux: call FluxModel.generate(...) or FluxModel(...) "
                           "(e.g. fm.generate) instead of the wrapped transformers model; to run it unrouted, "
                           "call model.set_attn_implementation('sdpa') first")
    if query.shape[2] != key.shape[2]:
        raise RuntimeError("flux's training forward takes whole sequences without a KV cache; generation runs on "
                           "FluxModel.generate")
    layer = module.layer_idx
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    decision = state.plan.decide(layer, query, state.segments)
    # a second call for a layer is gradient checkpointing re-running it in the backward: keeping its gate would keep
    # the recomputation's graph, and the activations it saved, alive until the backward ends (RouterPlan.decide)
    if layer not in state.decisions:
        state.decisions[layer] = decision.sa
        if decision.gate is not None:
            state.gates[layer] = decision.gate
    out = run_branches(query, key, value, decision, state, scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Idempotent registration under the name 'flux' (no mask function: flux builds its own masks from positions,
    so transformers passes attention_mask=None)."""
    AttentionInterface.register(ATTENTION_NAME, flux_attention_forward)
