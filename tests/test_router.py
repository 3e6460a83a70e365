"""Layer router: straight-through Gumbel gates, gradients through a frozen backbone, the temperature schedule,
threshold calibration, the global variant, and export -> reload (tiny random backbone, CPU, a few seconds)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flux.attention.patterns import StreamingPattern
from flux.backbone import backbone_fingerprint, load_backbone, tiny_random_config
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
    export_router(router, tmp_path, tiny, PATTERN.describe(), {"steps": 7})
    loaded, meta = load_router(tmp_path / "router.safetensors", tiny)
    assert meta["sparse"] == {"pattern": "streaming", "sink": 2, "window": 8}
    assert meta["training"] == {"steps": 7}
    assert meta["backbone_fingerprint"] == backbone_fingerprint(tiny.config)
    assert meta["backbone_architecture"]["num_hidden_layers"] == 4
    assert not loaded.training and loaded.config == router.config
    with torch.no_grad():
        out_a, plan_a = forward(tiny_model, router, batch)
        out_b, plan_b = forward(tiny_model, loaded, batch)
    assert 0 < int(out_a.decisions.sum()) < out_a.decisions.numel()  # a mix of FA and SA: the check is not vacuous
    assert torch.equal(out_a.decisions, out_b.decisions)
    assert plan_a.routed_layers() == plan_b.routed_layers()
    for i in plan_a.routed_layers():
        assert torch.equal(plan_a.logits[i], plan_b.logits[i])


def _pooled_reference(query: torch.Tensor, spans: list[list[list[int]]]) -> torch.Tensor:
    """float64 reference of a span pooling: per sample, for each span (a list of token indices), the mean over heads
    and over those tokens, the spans' vectors concatenated."""
    q = query.double().mean(dim=1)  # [B, T, D]
    return torch.stack([torch.cat([q[b, idx].mean(dim=0) for idx in sample]) for b, sample in enumerate(spans)])


@pytest.mark.parametrize(("pooling", "spans"), [
    # sample 0: context [2, 12), question [12, 18); sample 1: left-padded by 4, context [4, 12), question [12, 18)
    ("first_last", [[[2, 3, 4], [9, 10, 11], [12, 13, 14], [15, 16, 17]],
                    [[4, 5, 6], [9, 10, 11], [12, 13, 14], [15, 16, 17]]]),
    ("question", [[[12, 13, 14], [15, 16, 17]], [[12, 13, 14], [15, 16, 17]]]),
    ("first_token", [[[0]], [[4]]]),  # the first real token (sample 1's padding is skipped)
])
def test_span_poolings_read_exactly_their_tokens(pooling, spans):
    gen = torch.Generator().manual_seed(5)
    query = torch.randn(2, 3, 20, 4, generator=gen)
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, :4] = False
    valid[:, 18:] = True
    segments = {"context": torch.tensor([[2, 12], [4, 12]]), "question": torch.tensor([[12, 18], [12, 18]])}
    router = LayerRouter(2, 4, RouterConfig(pooling=pooling, pool_size=3)).double()
    assert router.mlps[0][0].in_features == 4 * len(spans[0])  # the MLP reads one head_dim vector per span
    expected = _pooled_reference(query, spans)
    for layer in range(2):
        logits = router.logits_for(layer, query.double(), segments, valid)
        torch.testing.assert_close(logits, router.mlps[layer](expected).float())


def test_first_token_router_gives_every_input_the_same_plan_and_question_pooling_does_not(tiny, tiny_model, batch,
                                                                                          tmp_path):
    """first_token reads a query that causal attention makes identical for every input: the control for context
    awareness; question pooling reads the input. Both export and reload with their own input size."""
    ids = batch["input_ids"].clone()
    ids[1, 6] = ids[0, 0]  # sample 1's first real token is sample 0's first token; the rest differs
    same_start = {**batch, "input_ids": ids}
    for pooling, same_plan in (("first_token", True), ("question", False)):
        router = scrambled_router(tiny, pooling=pooling).eval()
        export_router(router, tmp_path / pooling, tiny, PATTERN.describe())
        loaded, _ = load_router(tmp_path / pooling, tiny)
        with torch.no_grad():
            _, plan = forward(tiny_model, router, same_start)
            _, again = forward(tiny_model, loaded, same_start)
        for layer in plan.routed_layers():
            torch.testing.assert_close(plan.logits[layer], again.logits[layer])
            identical = torch.allclose(plan.logits[layer][0], plan.logits[layer][1], atol=1e-5)
            assert identical == same_plan, (pooling, layer)


def test_unknown_pooling_lists_the_choices():
    with pytest.raises(RouterConfigError, match=r"pooling must be one of \('first_last', 'question', 'first_token', "
                                                r"'mean'\), got 'last'"):
        RouterConfig(pooling="last")


def test_fingerprint_depends_on_architecture_not_name(tiny):
    same = load_backbone("tiny_random", seed=5)  # other weights, same architecture
    assert backbone_fingerprint(same.config) == tiny.fingerprint
    for change in ({"num_layers": 3}, {"hidden_size": 32}, {"num_kv_heads": 4}, {"vocab_size": 300}):
        assert tiny_random_config("llama", **change).to_dict() != tiny.config.to_dict()
        assert backbone_fingerprint(tiny_random_config("llama", **change)) != tiny.fingerprint, change
    rope = tiny_random_config("llama")
    rope.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    assert backbone_fingerprint(rope) != tiny.fingerprint
    assert backbone_fingerprint(tiny_random_config("qwen2")) != tiny.fingerprint


def test_load_router_names_the_mismatch(tiny, tmp_path):
    with pytest.raises(RouterCheckpointError, match="needs router.safetensors and router.json"):
        load_router(tmp_path)
    export_router(LayerRouter(tiny.num_layers, tiny.head_dim), tmp_path, tiny, PATTERN.describe())
    deeper = load_backbone("tiny_random", tiny={"num_layers": 6})
    with pytest.raises(RouterCheckpointError, match=r"trained for backbone 'tiny_random-llama' \(fingerprint "
                                                    r"\w{16}\), not for 'tiny_random-llama' \(fingerprint \w{16}\): "
                                                    r"num_hidden_layers 4 vs 6; load it onto the backbone"):
        load_router(tmp_path, deeper)
    renamed = dataclasses.replace(tiny, name="my/finetune")  # the same architecture under another name
    with pytest.warns(UserWarning, match="trained on 'tiny_random-llama' and is loaded onto 'my/finetune'"):
        load_router(tmp_path, renamed)


def test_router_json_without_fingerprint_is_checked_by_name_and_shape(tiny, tmp_path):
    """Routers exported before fingerprints (e.g. experiments/smollm2_8k/router) still load, checked by name."""
    export_router(LayerRouter(tiny.num_layers, tiny.head_dim), tmp_path, tiny, PATTERN.describe())
    meta = json.loads((tmp_path / "router.json").read_text())
    for key in ("backbone_fingerprint", "backbone_architecture", "weights_sha256"):
        del meta[key]
    (tmp_path / "router.json").write_text(json.dumps(meta))
    load_router(tmp_path, tiny)
    with pytest.raises(RouterCheckpointError, match="trained for backbone 'tiny_random-llama', not 'my/finetune'"):
        load_router(tmp_path, dataclasses.replace(tiny, name="my/finetune"))
    (tmp_path / "router.json").write_text(json.dumps(meta | {"num_layers": 30}))
    with pytest.raises(RouterCheckpointError, match="routes 30 layers but the backbone has 4"):
        load_router(tmp_path, tiny)
    (tmp_path / "router.json").write_text(json.dumps(meta | {"head_dim": 64}))
    with pytest.raises(RouterCheckpointError, match="head size 64 but the backbone's heads have size 16"):
        load_router(tmp_path, tiny)


def test_export_writes_readable_files_and_removes_stale_temps(tiny, tmp_path):
    stale = [tmp_path / ".router.safetensors.k1ll3d.tmp", tmp_path / ".router.json.k1ll3d.tmp",
             tmp_path / ".README.md.k1ll3d.tmp"]
    tmp_path.mkdir(exist_ok=True)
    for p in stale:
        p.write_bytes(b"half a file")
    unrelated = tmp_path / ".keep.tmp"
    unrelated.write_text("not ours")
    export_router(LayerRouter(tiny.num_layers, tiny.head_dim), tmp_path, tiny, PATTERN.describe())
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep.tmp", "README.md", "router.json",
                                                          "router.safetensors"]
    for name in ("README.md", "router.json", "router.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644


def test_a_failed_export_keeps_the_previous_pair(tiny, tmp_path, monkeypatch):
    first = scrambled_router(tiny)
    export_router(first, tmp_path, tiny, PATTERN.describe(), {"steps": 1})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. Ctrl-C while the weights are written

    monkeypatch.setattr("flux.router.save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_router(LayerRouter(tiny.num_layers, tiny.head_dim), tmp_path, tiny, PATTERN.describe(), {"steps": 2})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp file, old pair intact
    assert load_router(tmp_path, tiny)[1]["training"] == {"steps": 1}


KILLED_EXPORT = """
import os, signal, sys
import flux.router
from flux.backbone import backbone_fingerprint, load_backbone, tiny_random_config
from flux.router import LayerRouter, export_router

def save_then_die(tensors, path, *args, **kwargs):
    with open(path, "wb") as f:
        f.write(b"partial")
        f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

flux.router.save_file = save_then_die
tiny = load_backbone("tiny_random")
export_router(LayerRouter(tiny.num_layers, tiny.head_dim), sys.argv[1], tiny, {})
"""


def test_a_killed_export_leaves_the_old_pair_and_its_temp_is_removed_next_time(tiny, tmp_path):
    export_router(scrambled_router(tiny), tmp_path, tiny, PATTERN.describe(), {"steps": 1})
    proc = subprocess.run([sys.executable, "-c", KILLED_EXPORT, str(tmp_path)], capture_output=True, timeout=300,
                          check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".router.")]
    assert len(leftovers) == 1 and leftovers[0].endswith(".tmp")  # SIGKILL cannot clean up ...
    assert load_router(tmp_path, tiny)[1]["training"] == {"steps": 1}  # ... but the pair was never touched
    export_router(scrambled_router(tiny), tmp_path, tiny, PATTERN.describe(), {"steps": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "router.json", "router.safetensors"]


def test_weights_from_another_export_are_refused(tiny, tmp_path):
    """An export interrupted between its two renames leaves new weights beside the old router.json."""
    export_router(scrambled_router(tiny), tmp_path / "a", tiny, PATTERN.describe())
    export_router(LayerRouter(tiny.num_layers, tiny.head_dim), tmp_path / "b", tiny, PATTERN.describe())
    shutil.copy(tmp_path / "b" / "router.safetensors", tmp_path / "a" / "router.safetensors")
    with pytest.raises(RouterCheckpointError, match=r"router\.safetensors is not the file .*router\.json was written "
                                                    r"with \(its sha256 differs\)"):
        load_router(tmp_path / "a", tiny)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(("name", "damage", "message"), [
    ("router.safetensors", lambda p: p.write_bytes(b""), r"router\.safetensors is not a readable safetensors file"),
    ("router.safetensors", _truncate, r"router\.safetensors is not a readable safetensors file"),
    ("router.safetensors", lambda p: p.write_bytes(b"\x00" * 64), "is not a readable safetensors file"),
    ("router.json", lambda p: p.write_text(""), r"router\.json is not valid JSON .* empty, truncated or corrupt"),
    ("router.json", _truncate, r"router\.json is not valid JSON"),
    ("router.json", lambda p: p.write_text("[1, 2]"), r"router\.json lacks \['backbone', 'num_layers'"),
    ("router.json", lambda p: p.write_bytes(b"\xff\xfe{"), r"cannot read .*router\.json"),
])
def test_damaged_router_files_fail_with_one_message_naming_the_file(tiny, tmp_path, name, damage, message):
    export_router(scrambled_router(tiny), tmp_path, tiny, PATTERN.describe())
    damage(tmp_path / name)
    with pytest.raises(RouterCheckpointError, match=message) as err:
        load_router(tmp_path, tiny)
    assert str(tmp_path / name) in str(err.value)


@pytest.mark.parametrize(("layers", "head_dim"), [(4, 8), (6, 16)])
def test_weights_of_another_shape_are_refused(tiny, tmp_path, layers, head_dim):
    """router.json describing one router, router.safetensors holding another's weights (digest dropped, so the
    shape check itself is what fires)."""
    export_router(LayerRouter(tiny.num_layers, tiny.head_dim), tmp_path / "ok", tiny, PATTERN.describe())
    save_file(LayerRouter(layers, head_dim).state_dict(), str(tmp_path / "ok" / "router.safetensors"))
    meta = json.loads((tmp_path / "ok" / "router.json").read_text())
    del meta["weights_sha256"]
    (tmp_path / "ok" / "router.json").write_text(json.dumps(meta))
    with pytest.raises(RouterCheckpointError, match=r"router\.safetensors does not fit the router .*router\.json "
                                                    r"describes \(.*\); the two files come from different routers"):
        load_router(tmp_path / "ok", tiny)
