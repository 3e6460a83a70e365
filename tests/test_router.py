"""Layer router: straight-through Gumbel gates, gradients through a frozen backbone, the temperature schedule,
threshold calibration, the global variant, and export -> reload (tiny random backbone, CPU, a few seconds)."""

from __future__ import annotations

import math

import pytest
import torch

from flux.attention.patterns import StreamingPattern
from flux.backbone import load_backbone
from flux.model import FluxModel
from flux.objectives import answer_lm_loss, sample_sparsity
from flux.router import (
    LayerRouter,
    RouterCheckpointError,
    RouterConfig,
    RouterConfigError,
    calibrate_threshold,
    cosine_tau,
    export_router,
    gumbel_straight_through,
    load_router,
)

# A window much shorter than the inputs, so SA and FA differ and the gates matter for the loss.
PATTERN = StreamingPattern(sink=2, window=8)


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny_random")


@pytest.fixture(scope="module")
def tiny_model(tiny):
    return FluxModel(tiny, pattern=PATTERN)


@pytest.fixture(scope="module")
def batch():
    """Two left-padded samples (the second has 6 pads) with marked context/question spans and answer labels."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 250, (2, 48), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    ids[1, :6] = 0
    labels = torch.full_like(ids, -100)
    labels[:, 42:] = ids[:, 42:]
    segments = {"context": torch.tensor([[0, 34], [6, 34]]), "question": torch.tensor([[34, 42], [34, 42]])}
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "segments": segments}


def scrambled_router(tiny, **config) -> LayerRouter:
    """A router with random weights (seeded), so that argmax decisions differ across layers and samples."""
    router = LayerRouter(tiny.num_layers, tiny.head_dim, RouterConfig(**config))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in router.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 2.0)
    return router


def forward(model, router, batch, **plan_kwargs):
    plan = router.as_plan(**plan_kwargs)
    out = model(batch["input_ids"], batch["attention_mask"], plan=plan, segments=batch["segments"])
    return out, plan


def test_gumbel_straight_through_is_hard_forward_and_soft_backward():
    logits = (torch.randn(512, 2, generator=torch.Generator().manual_seed(0)) * 2).requires_grad_(True)
    weights = torch.randn(512)
    hard, soft = gumbel_straight_through(logits, tau=0.7, generator=torch.Generator().manual_seed(5))
    assert bool(((hard == 0) | (hard == 1)).all())
    assert torch.equal(hard.sum(dim=-1), torch.ones(512))
    assert torch.equal(hard.argmax(dim=-1), soft.argmax(dim=-1))
    (hard[:, 0] * weights).sum().backward()
    st_grad = logits.grad.clone()
    assert bool((st_grad != 0).all())

    # the straight-through gradient is exactly the soft sample's gradient (same noise: same generator seed)
    logits.grad = None
    _, soft_again = gumbel_straight_through(logits, tau=0.7, generator=torch.Generator().manual_seed(5))
    (soft_again[:, 0] * weights).sum().backward()
    torch.testing.assert_close(st_grad, logits.grad)


def test_gumbel_hard_samples_follow_the_softmax_probabilities():
    # Gumbel-max: P(argmax = FA) = softmax(logits)[FA] whatever the temperature
    logits = torch.tensor([[1.0, 0.0]]).expand(40000, 2)
    for tau in (0.5, 1.5):
        hard, _ = gumbel_straight_through(logits, tau, generator=torch.Generator().manual_seed(2))
        p_fa = 1.0 / (1.0 + math.exp(-1.0))
        assert abs(float(hard[:, 0].mean()) - p_fa) < 0.01


def test_router_gradients_flow_through_the_frozen_backbone(tiny, tiny_model, batch):
    router = LayerRouter(tiny.num_layers, tiny.head_dim, RouterConfig(init_fa_bias=0.0)).train()
    out, _ = forward(tiny_model, router, batch, generator=torch.Generator().manual_seed(3))
    assert out.gates is not None
    assert bool(((out.gates == 0) | (out.gates == 1)).all())
    assert torch.equal(out.gates, (~out.decisions).float())
    answer_lm_loss(out.logits, batch["labels"]).backward()
    for name, p in router.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    assert all(p.grad is None and not p.requires_grad for p in tiny.model.parameters())


def test_gradient_checkpointing_replays_the_forward_gates(batch):
    """Checkpointed layers re-run the router during backward; the gradient must be that of the sampled forward."""
    grads = []
    for checkpointing in (False, True):
        backbone = load_backbone("tiny_random")
        model = FluxModel(backbone, pattern=PATTERN)
        if checkpointing:
            backbone.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            backbone.model.train()
        torch.manual_seed(4)  # same router weights and, through the global RNG, the same Gumbel noise
        router = LayerRouter(backbone.num_layers, backbone.head_dim, RouterConfig(init_fa_bias=0.0)).train()
        out, _ = forward(model, router, batch)
        answer_lm_loss(out.logits, batch["labels"]).backward()
        grads.append([p.grad.clone() for p in router.parameters()])
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(plain, checkpointed)


def test_fresh_router_starts_every_layer_on_full_attention(tiny, tiny_model, batch):
    router = LayerRouter(tiny.num_layers, tiny.head_dim, RouterConfig(init_fa_bias=3.0)).eval()
    with torch.no_grad():
        out, plan = forward(tiny_model, router, batch)
    assert not bool(out.decisions.any())
    p_fa = torch.stack([plan.soft[i] for i in range(tiny.num_layers)], dim=1)
    torch.testing.assert_close(p_fa, torch.full_like(p_fa, 1 / (1 + math.exp(-3.0))), atol=5e-3, rtol=0)


def test_cosine_tau_matches_hand_computed_values():
    # 100 steps, cosine over the first 60: tau = 1 + 0.5 * 0.5 * (1 + cos(pi * step / 60)), then flat at 1.0
    expected = {0: 1.5, 15: 1.0 + 0.25 * (1 + math.sqrt(0.5)), 30: 1.25, 45: 1.0 + 0.25 * (1 - math.sqrt(0.5)),
                60: 1.0, 80: 1.0, 100: 1.0}
    for step, tau in expected.items():
        assert cosine_tau(step, 100, tau_start=1.5, tau_end=1.0, fraction=0.6) == pytest.approx(tau, abs=1e-12)
    # a rising schedule is the same curve mirrored
    assert cosine_tau(25, 50, tau_start=0.5, tau_end=2.0, fraction=1.0) == pytest.approx(1.25, abs=1e-12)


@pytest.mark.parametrize(("name", "value"), [("tau_start", 0.0), ("tau_end", -1.0)])
def test_cosine_tau_rejects_non_positive_temperatures(name, value):
    with pytest.raises(RouterConfigError, match=f"{name}={value}"):
        cosine_tau(0, 10, **{name: value})


@pytest.mark.parametrize("tau", [0.0, -0.5])
def test_router_rejects_non_positive_temperature(tiny, tau):
    with pytest.raises(RouterConfigError, match=rf"tau must be > 0, got {tau}"):
        RouterConfig(tau=tau)
    router = LayerRouter(tiny.num_layers, tiny.head_dim)
    with pytest.raises(RouterConfigError, match=rf"got {tau}"):
        router.set_tau(tau)


def test_calibrated_threshold_hits_the_requested_sparsity(tiny, tiny_model, batch):
    p_sa = torch.rand(64, 30, generator=torch.Generator().manual_seed(0))
    for sparsity in (0.0, 0.25, 0.5, 0.8, 1.0):
        threshold = calibrate_threshold(p_sa, sparsity)
        assert int((p_sa > threshold).sum()) == round(sparsity * p_sa.numel())
    with pytest.raises(RouterConfigError, match="1.5"):
        calibrate_threshold(p_sa, 1.5)

    # end to end: a threshold calibrated on the router's own P(SA) routes exactly half of the 2 x 4 decisions to SA
    router = scrambled_router(tiny).eval()
    with torch.no_grad():
        _, plan = forward(tiny_model, router, batch)
        p = 1 - torch.stack([plan.soft[i] for i in range(tiny.num_layers)], dim=1)
        out, _ = forward(tiny_model, router, batch, threshold=calibrate_threshold(p, 0.5))
    assert int(out.decisions.sum()) == out.decisions.numel() // 2
    assert torch.equal(out.decisions, p > calibrate_threshold(p, 0.5))


def test_global_router_keeps_early_layers_dense_and_gets_constraint_gradients(tiny, tiny_model, batch):
    router = LayerRouter(tiny.num_layers, tiny.head_dim, RouterConfig(kind="global", read_layer=1,
                                                                      init_fa_bias=0.0)).train()
    out, plan = forward(tiny_model, router, batch, generator=torch.Generator().manual_seed(6))
    assert plan.routed_layers() == [2, 3]
    assert not bool(out.decisions[:, :2].any())
    assert sorted(plan.gates) == [2, 3]
    for i in (2, 3):
        assert torch.equal(plan.gates[i], (~out.decisions[:, i]).float())
    # the sparsity constraint reads these straight-through gates: its gradient must reach the global MLP
    s = sample_sparsity(plan.gates, tiny.num_layers, 2, torch.device("cpu"))
    s.sum().backward()
    last = router.mlps[0][-1]
    assert float(last.weight.grad.abs().sum()) > 0


def test_global_router_rejects_a_read_layer_outside_the_model(tiny):
    with pytest.raises(RouterConfigError, match=r"read_layer must be in \[0, 4\), got 7"):
        LayerRouter(tiny.num_layers, tiny.head_dim, RouterConfig(kind="global", read_layer=7))


@pytest.mark.parametrize("kind", ["per_layer", "global"])
def test_exported_router_reloads_and_reproduces_decisions(tiny, tiny_model, batch, tmp_path, kind):
    router = scrambled_router(tiny, kind=kind, read_layer=0).eval()
    export_router(router, tmp_path, tiny.name, PATTERN.describe(), {"steps": 7})
    loaded, meta = load_router(tmp_path / "router.safetensors", backbone_name=tiny.name, num_layers=tiny.num_layers)
    assert meta["sparse"] == {"pattern": "streaming", "sink": 2, "window": 8}
    assert meta["training"] == {"steps": 7}
    assert not loaded.training and loaded.config == router.config
    with torch.no_grad():
        out_a, plan_a = forward(tiny_model, router, batch)
        out_b, plan_b = forward(tiny_model, loaded, batch)
    assert 0 < int(out_a.decisions.sum()) < out_a.decisions.numel()  # a mix of FA and SA: the check is not vacuous
    assert torch.equal(out_a.decisions, out_b.decisions)
    assert plan_a.routed_layers() == plan_b.routed_layers()
    for i in plan_a.routed_layers():
        assert torch.equal(plan_a.logits[i], plan_b.logits[i])


def test_load_router_names_the_mismatch(tiny, tmp_path):
    with pytest.raises(RouterCheckpointError, match="needs router.safetensors and router.json"):
        load_router(tmp_path)
    export_router(LayerRouter(tiny.num_layers, tiny.head_dim), tmp_path, tiny.name, PATTERN.describe())
    with pytest.raises(RouterCheckpointError, match="trained for backbone 'tiny_random-llama', not 'other/model'"):
        load_router(tmp_path, backbone_name="other/model")
    with pytest.raises(RouterCheckpointError, match="routes 4 layers but the backbone has 30"):
        load_router(tmp_path, num_layers=30)
