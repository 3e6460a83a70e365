"""Gate plans: a float plan is the weight of full attention per sample and layer, so only finite values in [0, 1]
are accepted. NaN fails every comparison and used to slip through the range check, giving NaN logits while the
decisions reported full attention."""

from __future__ import annotations

import math

import pytest
import torch

from flux.backbone import load_backbone
from flux.errors import FluxUserError
from flux.model import FluxModel
from flux.plan import GatePlan, PlanError, make_plan


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 1.5, -0.25])
def test_gate_plan_rejects_values_that_are_not_weights(bad):
    gates = torch.full((2, 3), 0.5)
    gates[1, 2] = bad
    with pytest.raises(PlanError, match=r"gate plan value .* at \(sample 1, layer 2\) is not a number in \[0, 1\]"):
        make_plan(gates, num_layers=3, batch_size=2)
    assert issubclass(PlanError, FluxUserError)  # the CLI prints it as one line


def test_gate_plan_accepts_the_closed_interval_and_a_nan_never_reaches_the_model():
    bb = load_backbone("tiny_random", tiny={"num_layers": 3})
    fm = FluxModel(bb)
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    edges = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, 0.25]])
    assert isinstance(make_plan(edges, 3, 2), GatePlan)
    out = fm(ids, plan=edges)
    assert torch.isfinite(out.logits).all()
    assert out.decisions.tolist() == [[True, False, False], [False, True, True]]  # z < 0.5 means SA
    with pytest.raises(PlanError, match="not a number in"):
        fm(ids, plan=torch.tensor([[0.0, math.nan, 0.5], [1.0, 0.0, 0.25]]))
