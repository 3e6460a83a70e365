"""Routing plans: what decides, per layer and per sample, whether a layer runs full (FA) or sparse (SA) attention.

A plan answers `decide(layer_idx, query, segments)` once per layer during prefill. Static plans ignore the query;
the learned router (flux.router) reads it. Decode never asks the plan again: the cache keeps the prefill decisions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from flux.errors import FluxUserError


class PlanError(FluxUserError):
    """A routing plan does not fit the model or the batch."""


@dataclass
class LayerDecision:
    """`sa` is the hard decision per sample (True = sparse). `gate` ([B], weight of FA) is set only when both branches
    must run and be mixed (training); `uniform` is True/False when every sample agrees and that is known without
    looking at a device tensor, which lets static plans skip a GPU sync."""

    sa: torch.Tensor
    gate: torch.Tensor | None = None
    uniform: bool | None = None


class Plan:
    """Base class for routing plans."""

    name = "plan"

    def decide(self, layer_idx: int, query: torch.Tensor, segments: dict[str, torch.Tensor] | None) -> LayerDecision:
        raise NotImplementedError

    def query_positions(self, batch: int, length: int, segments: dict[str, torch.Tensor] | None,
                        device: torch.device) -> torch.Tensor | None:
        """Positions [B, K] of the post-rotary queries `decide` reads, or None when it reads all of them.

        The inference engine computes only these queries before a layer is decided and then passes `decide` a
        [B, H, K, D] query holding exactly them, so the full-length queries of a layer never have to exist at once
        (they are computed chunk by chunk after the decision). The default, None, is right for any plan."""
        return None


class StaticPlan(Plan):
    """One fixed choice per layer for every sample (e.g. all dense, all sparse, or a hand-picked list)."""

    name = "static"

    def __init__(self, sa_layers: Sequence[bool]) -> None:
        self.sa_layers = [bool(x) for x in sa_layers]

    def query_positions(self, batch: int, length: int, segments: dict[str, torch.Tensor] | None,
                        device: torch.device) -> torch.Tensor | None:
        return torch.zeros(batch, 0, dtype=torch.long, device=device)  # decided without reading a query

    def decide(self, layer_idx: int, query: torch.Tensor, segments: dict[str, torch.Tensor] | None) -> LayerDecision:
        value = self.sa_layers[layer_idx]
        return LayerDecision(torch.full((query.shape[0],), value, dtype=torch.bool, device=query.device),
                             uniform=value)


class SamplePlan(Plan):
    """A precomputed hard decision per sample and layer: BoolTensor [B, L], True = SA."""

    name = "per_sample"

    def __init__(self, sa: torch.Tensor) -> None:
        self.sa = sa

    def query_positions(self, batch: int, length: int, segments: dict[str, torch.Tensor] | None,
                        device: torch.device) -> torch.Tensor | None:
        return torch.zeros(batch, 0, dtype=torch.long, device=device)  # decided without reading a query

    def decide(self, layer_idx: int, query: torch.Tensor, segments: dict[str, torch.Tensor] | None) -> LayerDecision:
        return LayerDecision(self.sa[:, layer_idx].to(query.device))


class GatePlan(Plan):
    """Per-sample gates z in [0, 1] ([B, L], weight of FA): the layer outputs z * FA + (1 - z) * SA."""

    name = "gates"

    def __init__(self, gates: torch.Tensor) -> None:
        self.gates = gates

    def query_positions(self, batch: int, length: int, segments: dict[str, torch.Tensor] | None,
                        device: torch.device) -> torch.Tensor | None:
        return torch.zeros(batch, 0, dtype=torch.long, device=device)  # decided without reading a query

    def decide(self, layer_idx: int, query: torch.Tensor, segments: dict[str, torch.Tensor] | None) -> LayerDecision:
        z = self.gates[:, layer_idx].to(query.device)
        return LayerDecision(z < 0.5, gate=z)


def make_plan(plan: Any, num_layers: int, batch_size: int) -> Plan:
    """Turn the user-facing forms into a Plan, checking that they fit the model and the batch."""
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, str):
        if plan == "dense":
            return StaticPlan([False] * num_layers)
        if plan == "sparse":
            return StaticPlan([True] * num_layers)
        raise PlanError(f"unknown plan {plan!r}; use 'dense', 'sparse', a list of {num_layers} booleans "
                        "(True = sparse), a [batch, layers] tensor, or a router")
    if isinstance(plan, torch.Tensor):
        if plan.dim() != 2 or plan.shape != (batch_size, num_layers):
            raise PlanError(f"plan tensor has shape {tuple(plan.shape)}, expected (batch={batch_size}, "
                            f"layers={num_layers})")
        if plan.dtype == torch.bool:
            return SamplePlan(plan)
        if not plan.is_floating_point():
            raise PlanError(f"plan tensor dtype {plan.dtype} is neither bool (hard decisions) nor float (gates)")
        # NaN fails both comparisons, so `~(in range)` catches NaN and +-inf along with values outside [0, 1]
        bad = ~((plan >= 0) & (plan <= 1))
        if bool(bad.any()):
            sample, layer = (int(i) for i in bad.nonzero()[0])
            raise PlanError(f"gate plan value {float(plan[sample, layer])} at (sample {sample}, layer {layer}) is not "
                            "a number in [0, 1]; gates are the weight of full attention, finite and in [0, 1]")
        return GatePlan(plan)
    if isinstance(plan, (list, tuple)):
        if len(plan) != num_layers:
            raise PlanError(f"plan has {len(plan)} entries but the backbone has {num_layers} layers; give one "
                            "boolean per layer (True = sparse)")
        if not all(isinstance(x, (bool, int)) and x in (0, 1) for x in plan):
            raise PlanError("plan list entries must be booleans (True = sparse attention)")
        return StaticPlan(plan)
    raise PlanError(f"unsupported plan of type {type(plan).__name__}")


def spread_sa_layers(num_layers: int, fraction: float) -> list[bool]:
    """A static plan with round(fraction * L) SA layers spread evenly over depth (layer i is SA iff an SA slot's
    centre falls on it); used by the benchmark's SA fractions."""
    if not 0.0 <= fraction <= 1.0:
        raise PlanError(f"SA fraction must be in [0, 1], got {fraction}")
    n_sa = round(fraction * num_layers)
    chosen = {int((i + 0.5) * num_layers / n_sa) for i in range(n_sa)} if n_sa else set()
    return [i in chosen for i in range(num_layers)]
