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

from flux.attention.backends import full_attention, sparse_attention
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


def attach(model: torch.nn.Module) -> int:
    """Count the attention modules (anything with a `layer_idx` and a `q_proj`) the dispatcher will serve."""
    return sum(1 for module in model.modules() if hasattr(module, "layer_idx") and hasattr(module, "q_proj"))


def run_branches(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, decision: LayerDecision,
                 state: RoutingState, scaling: float) -> torch.Tensor:
    """Run only the branch(es) the decision needs; a soft/straight-through gate runs both and mixes them."""
    q_pos, valid = state.q_pos, state.valid

    def fa() -> torch.Tensor:
        return full_attention(query, key, value, q_pos, q_pos, valid, scaling, state.fa_backend, state.masks)

    def sa(rows: torch.Tensor | None = None) -> torch.Tensor:
        return sparse_attention(query, key, value, q_pos, q_pos, valid, state.pattern, scaling,
                                state.sa_backend, rows, state.masks)

    if decision.gate is not None:
        z = decision.gate.to(query.dtype)[:, None, None, None]
        return z * fa() + (1 - z) * sa()
    uniform = decision.uniform
    if uniform is None:
        uniform = True if bool(decision.sa.all()) else (False if not bool(decision.sa.any()) else None)
    if uniform is True:
        return sa()
    if uniform is False:
        return fa()
    return sa(decision.sa)


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
    state.decisions[layer] = decision.sa
    if decision.gate is not None:
        state.gates[layer] = decision.gate
    out = run_branches(query, key, value, decision, state, scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Idempotent registration under the name 'flux' (no mask function: flux builds its own masks from positions,
    so transformers passes attention_mask=None)."""
    AttentionInterface.register(ATTENTION_NAME, flux_attention_forward)
