"""Training entry point: Hydra composition (experiments, sweeps, launchers), short CPU runs through `flux.train.run`,
checkpoint resume, router export, DDP with two CPU processes, and clear errors for bad settings.

Most runs use a tiny random Llama saved as a local model folder with SmolLM2's tokenizer: the data pipeline needs a
real tokenizer with a chat template (the byte tokenizer of `tiny_random` cannot batch-encode). The SmolLM2 run and
the multi-process runs are marked slow.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from config_tools import leaves
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from wandb_files import wandb_run_summary

import flux.train
from flux.attention.patterns import PatternError
from flux.backbone import SMOLLM2_NAME, BackboneError, load_backbone
from flux.conf import CONFIG_MODULE
from flux.configs import build_pattern
from flux.data.module import FluxDataModule
from flux.errors import ConfigError, FluxUserError
from flux.lit import BACKBONE_PREFIX, AtomicCheckpointIO
from flux.model import FluxModel
from flux.objectives import ObjectiveError, TargetSchedule
from flux.router import LayerRouter, RouterConfigError, cosine_tau, load_router

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
TASKS = ["niah_single", "fwe"]
TINY_LAYERS, TINY_HEAD_DIM = 3, 8
# Sink + window far below the ~100-token prompts, so SA differs from FA and the LM loss moves the router.
SMALL_DATA = ["logger=csv", "data.n_train=1", "data.n_val=1", "data.length_tokens=64", "data.max_tokens=256",
              "data.batch_size=2", f"data.tasks=[{','.join(TASKS)}]", "sparse.sink=4", "sparse.window=16"]


def compose_train(overrides: list[str], hydra_config: bool = False):
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=hydra_config)


def tiny_overrides(tiny_dir: Path, out: Path | None, synthetic: bool = True) -> list[str]:
    base = [f"backbone.source={tiny_dir}", "backbone.dtype=float32", "trainer.limit_val_batches=1",
            "++trainer.val_check_interval=1"]  # ++: the gpu/ddp trainer configs leave it at its default
    base += SMALL_DATA if synthetic else ["logger=csv"]
    return base + ([f"output_dir={out}"] if out is not None else [])


def metric_rows(output_dir: str | Path, key: str) -> dict[int, float]:
    """{step: value} of one metric from the CSV logger's metrics.csv."""
    path = Path(output_dir) / "csv" / "version_0" / "metrics.csv"
    with path.open() as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def router_state(ckpt: dict) -> dict[str, torch.Tensor]:
    return {k.removeprefix("router."): v for k, v in ckpt["state_dict"].items() if k.startswith("router.")}


def adam_steps(ckpt: dict) -> set[float]:
    return {float(state["step"]) for state in ckpt["optimizer_states"][0]["state"].values()}


# -- short runs on the tiny backbone -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resumed(tiny_dir, tmp_path_factory):
    """2 steps with a checkpoint after each, then a resume from last.ckpt up to step 3 (into another folder)."""
    root = tmp_path_factory.mktemp("runs")
    first = flux.train.run(compose_train(
        tiny_overrides(tiny_dir, root / "first") + ["trainer.max_steps=2", "checkpoint_every=1"]))
    last = root / "first" / "checkpoints" / "last.ckpt"
    second = flux.train.run(compose_train(
        tiny_overrides(tiny_dir, root / "second") + ["trainer.max_steps=3", "checkpoint_every=1", f"resume={last}"]))
    return first, second


def test_resume_continues_step_count_and_optimizer_state(resumed):
    first, second = resumed
    assert (first["global_step"], second["global_step"]) == (2, 3)
    first_dir, second_dir = Path(first["output_dir"]), Path(second["output_dir"])
    assert sorted(p.name for p in (first_dir / "checkpoints").iterdir()) == [
        "last.ckpt", "step000001.ckpt", "step000002.ckpt"]
    a, b = load_ckpt(first_dir / "checkpoints" / "last.ckpt"), load_ckpt(second_dir / "checkpoints" / "last.ckpt")
    assert (a["global_step"], b["global_step"]) == (2, 3)
    # Adam's per-parameter step counters go on from the checkpoint (a fresh optimizer would stand at 1)
    assert adam_steps(a) == {2.0} and adam_steps(b) == {3.0}
    assert len(b["optimizer_states"][0]["state"]) == len(router_state(b))
    assert any(not torch.equal(router_state(a)[k], router_state(b)[k]) for k in router_state(a))
    # lambdas only grow (ascent on |s - t| and (s - t)^2): the resumed run starts from the saved values
    for name in ("constraint.lambda1", "constraint.lambda2"):
        assert bool((b["state_dict"][name] >= a["state_dict"][name]).all())
    assert float(b["state_dict"]["constraint.lambda1"].sum()) > 0


def test_checkpoint_holds_router_and_lambdas_but_never_the_backbone(resumed, tiny_dir):
    first, _ = resumed
    folder = Path(first["output_dir"]) / "checkpoints"
    for path in folder.iterdir():
        ckpt = load_ckpt(path)
        keys = set(ckpt["state_dict"])
        assert not any(k.startswith(BACKBONE_PREFIX) for k in keys)
        expected = {f"router.{k}" for k in LayerRouter(TINY_LAYERS, TINY_HEAD_DIM).state_dict()}
        assert keys == expected | {"constraint.lambda1", "constraint.lambda2"}
        assert ckpt["flux"]["backbone"] == str(tiny_dir) and ckpt["flux"]["tasks"] == TASKS
    assert not any(p.name.startswith(".") for p in folder.iterdir())  # no temp files left by the atomic writer


def test_logged_temperature_and_target_follow_their_schedules(resumed):
    first, second = resumed
    objective = OmegaConf.load(CONF / "objective" / "lm.yaml")
    schedule = TargetSchedule(end=objective.target, start=objective.target_start, ramp_steps=objective.ramp_steps)
    for result, max_steps, steps in ((first, 2, [0, 1]), (second, 3, [2])):
        tau = metric_rows(result["output_dir"], "train/tau")
        assert sorted(tau) == steps
        for step in steps:
            assert tau[step] == pytest.approx(cosine_tau(step, max_steps, 1.5, 1.0, 0.6), abs=1e-6)
        target = metric_rows(result["output_dir"], "train/target")
        for step in steps:
            assert target[step] == pytest.approx(schedule.target("fwe", step), abs=1e-6)
    assert cosine_tau(1, 2) != 1.5 and cosine_tau(1, 2) != 1.0  # step 1 of 2 lies inside the cosine segment


def test_exported_router_reloads_and_decides_like_the_trained_one(resumed, tiny_dir):
    _, second = resumed
    backbone = load_backbone(str(tiny_dir), dtype="float32")
    loaded, meta = load_router(second["router_dir"], backbone)
    assert meta["sparse"] == {"pattern": "streaming", "sink": 4, "window": 16}
    training = meta["training"]
    assert training["steps"] == 3 and training["tasks"] == TASKS
    # validation ran after the last step, so Omega per task comes from it, with the target of that step
    assert training["sparsity_source"] == "last validation pass"
    assert training["sparsity"] == {t: training["final_metrics"][f"val/sparsity/{t}"] for t in TASKS}
    objective = OmegaConf.load(CONF / "objective" / "lm.yaml")
    schedule = TargetSchedule(end=objective.target, start=objective.target_start, ramp_steps=objective.ramp_steps)
    assert training["targets"] == {t: pytest.approx(schedule.target(t, 3)) for t in TASKS}
    assert training["task_types"] == {"niah_single": "retrieval", "fwe": "holistic"}
    assert "| retrieval | niah_single |" in (Path(second["router_dir"]) / "README.md").read_text()
    trained_state = router_state(load_ckpt(Path(second["output_dir"]) / "checkpoints" / "last.ckpt"))
    trained = LayerRouter(TINY_LAYERS, TINY_HEAD_DIM, loaded.config)
    trained.load_state_dict(trained_state)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, trained_state[k])

    model = FluxModel(backbone, pattern=build_pattern(compose_train(tiny_overrides(tiny_dir, None))))
    data = FluxDataModule(backbone.tokenizer, tasks=TASKS, n_train=1, n_val=1, length_tokens=64, batch_size=2)
    data.setup()
    batch = next(iter(data.val_dataloader()))
    plans = []
    with torch.no_grad():
        for router in (trained.eval(), loaded):
            plan = router.as_plan()
            out = model(batch["input_ids"], batch["attention_mask"], plan=plan, segments=batch["segments"])
            plans.append((out.decisions, plan.logits))
    assert torch.equal(plans[0][0], plans[1][0])
    for i in range(TINY_LAYERS):
        assert torch.equal(plans[0][1][i], plans[1][1][i])


def test_global_router_is_trained_by_the_sparsity_constraint(tiny_dir, tmp_path):
    """With the LM loss switched off only the Lagrangian can move the router; its gradient must reach the global
    router (whose early layers have no gate). Step 1 raises the lambdas from 0, step 2 must change the router."""
    result = flux.train.run(compose_train(tiny_overrides(tiny_dir, tmp_path) + [
        "router=global", "objective.lm_weight=0", "objective.target_start=0.5", "trainer.max_steps=2",
        "checkpoint_every=1", "trainer.limit_val_batches=0"]))
    assert result["global_step"] == 2
    after_1 = router_state(load_ckpt(tmp_path / "checkpoints" / "step000001.ckpt"))
    after_2 = router_state(load_ckpt(tmp_path / "checkpoints" / "last.ckpt"))
    assert any(not torch.equal(after_1[k], after_2[k]) for k in after_1)
    _, meta = load_router(result["router_dir"])
    assert meta["router"]["kind"] == "global" and meta["router"]["read_layer"] == 1


def test_resume_refuses_a_checkpoint_of_another_backbone(resumed, tiny_dir, tmp_path):
    other = tmp_path / "other_model"
    shutil.copytree(tiny_dir, other)  # same weights, another backbone name: the check is on identity, not shapes
    last = Path(resumed[0]["output_dir"]) / "checkpoints" / "last.ckpt"
    cfg = compose_train(tiny_overrides(other, tmp_path / "run") + ["trainer.max_steps=3", f"resume={last}"])
    with pytest.raises(ValueError, match=f"trained on backbone '{tiny_dir}'.*resume with the same backbone"):
        flux.train.run(cfg)


def test_atomic_checkpoint_io_keeps_the_old_file_when_a_write_fails(tmp_path):
    killed = [tmp_path / ".step000010.ckpt.a1b2c3.tmp", tmp_path / ".last.ckpt.d4e5f6.tmp"]  # a SIGKILLed run's temps
    for p in killed:
        p.write_bytes(b"half a checkpoint")
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, target)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the first save swept the stale temps
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    with pytest.raises(Exception, match="pickle"):
        io.save_checkpoint({"step": torch.tensor(2), "unpicklable": lambda: None}, target)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind
    assert int(torch.load(target, weights_only=False)["step"]) == 1


# -- the quickstart: validation, progress bar, summary ----------------------------------------------------------

QUICK = ["data.tasks=[niah_single,fwe]", "data.length_tokens=128", "data.max_tokens=256", "trainer.max_steps=4",
         "trainer.val_check_interval=2"]


def test_quickstart_config_validates_every_task_more_than_once():
    """The quickstart (`python -m flux.train`, no overrides) must validate during its run: an epoch of its data is
    longer than the run, so validation is counted in steps, and each pass covers the whole validation split."""
    cfg = compose_train(["output_dir=unused"]).copy()
    trainer, data = cfg.trainer, cfg.data
    assert trainer.check_val_every_n_epoch is None and 2 * trainer.val_check_interval <= trainer.max_steps
    split = len(data.tasks) * data.n_val * (1 if isinstance(data.length_tokens, int) else len(data.length_tokens))
    assert trainer.limit_val_batches * (data.val_batch_size or data.batch_size) >= split


@pytest.fixture(scope="module")
def quickstart(tiny_dir, tmp_path_factory):
    """`python -m flux.train` with the quickstart's trainer, logger (W&B offline) and data settings, shortened
    (QUICK) and on the tiny backbone so it takes seconds; its output (progress bar and end-of-run summary) is kept."""
    out = tmp_path_factory.mktemp("quickstart")
    cmd = [sys.executable, "-m", "flux.train", f"backbone.source={tiny_dir}", "backbone.dtype=float32", *QUICK,
           f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, check=False, cwd=out, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_quickstart_validates_every_task_and_maps_each_validation_pass(quickstart):
    out, _ = quickstart
    cfg = OmegaConf.load(out / ".hydra" / "config.yaml")
    tasks, every, steps = list(cfg.data.tasks), cfg.trainer.val_check_interval, cfg.trainer.max_steps
    passes = list(range(every, steps + 1, every))
    assert len(passes) >= 2  # the quickstart validates more than once
    for step in passes:
        records = [json.loads(line) for line in (out / "routing_maps" / f"val_step{step:06d}.routing.jsonl").open()]
        assert len(records) == len(tasks) * cfg.data.n_val  # the whole validation split, every task
        assert {r["task"] for r in records} == set(tasks) and all(r["score"] is None for r in records)
        assert (out / "routing_maps" / f"val_step{step:06d}.png").stat().st_size > 10_000
    val = metric_rows(out, "val/sparsity_hard")
    assert sorted(val) == [s - 1 for s in passes]  # Lightning files validation under the last training step
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))  # real W&B offline run files beside the CSV


def test_quickstart_progress_bar_shows_loss_sparsity_target_and_multipliers(quickstart):
    out, proc = quickstart
    final = {k: v[max(v)] for k, v in ((k, metric_rows(out, k)) for k in
                                        ("train/loss", "train/sparsity_hard", "train/target", "train/lambda1"))}
    bar = proc.stdout.replace("\r", "\n").splitlines()  # Lightning draws its bars on stdout
    last = [line for line in bar if "Epoch" in line and "loss=" in line][-1]
    assert f"loss={final['train/loss']:.3f}" in last
    assert f"Ω={final['train/sparsity_hard']:.2f}" in last and f"target={final['train/target']:.2f}" in last
    assert f"λ1={final['train/lambda1']:.3g}" in last and "λ2=" in last and "val Ω=" in last


def test_quickstart_ends_with_a_summary(quickstart):
    out, proc = quickstart
    summary = json.loads((out / "router" / "router.json").read_text())["training"]
    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("flux.train: "))
    text = "\n".join(lines[start:])
    assert f"flux.train: {summary['steps']} steps, final loss {summary['final_loss']:.4f}" in text
    assert "sparsity Ω per task (last validation pass) vs target:" in text
    for task in summary["tasks"]:
        assert (f"  {task:<24} {summary['task_types'][task]:<10} Ω {summary['sparsity'][task]:.2f}  "
                f"target {summary['targets'][task]:.2f}") in text
    assert f"router       {out / 'router'}  (router.safetensors, router.json, README.md)" in text
    assert f"metrics.csv  {out / 'csv' / 'version_0' / 'metrics.csv'}" in text
    run_dir = next((out / "wandb").glob("offline-run-*"))
    assert f"W&B run      {run_dir}  (offline; upload with: wandb sync {run_dir})" in text


def test_readme_jsonl_example_trains_on_a_small_file(tiny_dir, tmp_path):
    """README: `python -m flux.train data=jsonl data.train_files=[train.jsonl]` with a file of a few records."""
    records = [{"context": f"Note {i}: the locker code is {1000 + i}. " + "Routine entries follow. " * 20,
                "question": f"What is the locker code in note {i}?", "answer": str(1000 + i)} for i in range(6)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = flux.train.run(compose_train([f"backbone.source={tiny_dir}", "backbone.dtype=float32", "data=jsonl",
                                           f"data.train_files=[{train}]", "logger=csv", f"output_dir={tmp_path / 'run'}"]))
    summary = result["summary"]
    assert summary["steps"] == 20 and summary["sparsity_source"] == "last validation pass"
    assert list(summary["sparsity"]) == ["sft"]  # records without a task field share the task "sft"
    assert load_router(result["router_dir"])[1]["training"]["steps"] == 20


# -- clear errors ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "error", "message"), [
    (["sparse.name=nope"], PatternError,
     r"unknown sparse pattern 'nope'; registered patterns: streaming, triangle, xattn"),
    (["trainer.max_steps=0"], ConfigError,
     r"trainer.max_steps=0 must be a positive number of training steps; a run of 0 steps trains nothing"),
    (["checkpoint_every=0"], ConfigError, r"checkpoint_every=0 must be a positive number of training steps; or null"),
    (["attention.sa_backend=triton"], ConfigError,
     r"attention.sa_backend=triton runs Triton kernels, which need a CUDA device"),
    (["data.length_tokens=200", "data.max_tokens=150"], ValueError,
     r"> data\.max_tokens=150; lower data\.length_tokens or raise data\.max_tokens"),
    (["backbone.source=null"], BackboneError, r"backbone.source=None is empty; give a preset"),
    (["data.length_tokens=2100", "data.max_tokens=3000", "data.tasks=[fwe]"], ConfigError,
     r"the longest training prompt has \d+ tokens but the backbone has 2048 positions; set data.max_tokens=2048"),
    (["trainer.precision=33"], ConfigError, r"lightning.Trainer: Precision 33 is invalid.*; fix this setting"),
    (["objective.target=-0.3"], ObjectiveError, r"end=-0\.3 must lie in \[0, 1\]"),
    (["router.tau_start=0"], RouterConfigError, r"tau must be > 0, got 0\.0"),
    (["router.tau_end=-1"], RouterConfigError, r"tau_end=-1\.0"),
    (["data=jsonl", "data.train_files=[/nonexistent/train.jsonl]"], FileNotFoundError,
     r"data file '/nonexistent/train\.jsonl' does not exist"),
])
def test_bad_settings_fail_before_training_with_a_clear_message(tiny_dir, tmp_path, overrides, error, message,
                                                               monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the Triton check must see a CPU without the interpreter
    synthetic = "data=jsonl" not in overrides  # the small synthetic settings do not exist in the jsonl data config
    cfg = compose_train(tiny_overrides(tiny_dir, tmp_path, synthetic) + overrides)
    with pytest.raises(error, match=message) as raised:
        flux.train.run(cfg)
    assert isinstance(raised.value, FluxUserError)  # so the CLI prints it as one line
    assert not (tmp_path / "checkpoints").exists()


# -- composition -------------------------------------------------------------------------------------------------

EXPERIMENTS = {
    "qwen_32k": {"backbone.source": "Qwen/Qwen3-8B", "trainer.devices": 8, "trainer.precision": "bf16-mixed",
                 "trainer.strategy._target_": "lightning.pytorch.strategies.FSDPStrategy",
                 "data.length_tokens": [8192, 16384, 32768], "data.max_tokens": 34000, "objective.target": 0.5,
                 "objective.distill_weight": 1.0, "logger._target_": "lightning.pytorch.loggers.WandbLogger",
                 "logger.offline": False, "gradient_checkpointing": True, "trainer.max_steps": 1000},
    "llama_128k": {"backbone.source": "meta-llama/Llama-3.1-8B-Instruct", "trainer.devices": 8,
                   "trainer.strategy._target_": "lightning.pytorch.strategies.FSDPStrategy",
                   "data.length_tokens": [32768, 65536, 130000], "data.max_tokens": 131072,
                   "objective.target": 0.5, "sparse.window": 4096, "gradient_checkpointing": True},
    "smollm2_8k": {"backbone.source": "smollm2_135m", "trainer.accelerator": "gpu", "trainer.devices": 1,
                   "data.length_tokens": [1024, 2048, 4096], "logger._target_": "lightning.pytorch.loggers.CSVLogger"},
}


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_experiment_configs_compose_with_their_values(experiment, tmp_path):
    cfg = compose_train([f"+experiment={experiment}", f"output_dir={tmp_path}"])
    OmegaConf.resolve(cfg)  # every interpolation resolves
    for key, value in EXPERIMENTS[experiment].items():
        assert OmegaConf.select(cfg, key) == value, key
    # every value the experiment file sets lands in the composed config (it is a global package, not nested)
    own = OmegaConf.to_container(OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml"))
    own.pop("defaults")
    for key, value in leaves(own):
        assert OmegaConf.select(cfg, key) == value, key
    assert max(cfg.data.length_tokens) < cfg.data.max_tokens  # room for the chat template around a prompt
    # the objects the entry point builds before touching weights come out of this config
    assert build_pattern(cfg).describe()["window"] == cfg.sparse.window
    router = flux.train.build_router(cfg, num_layers=4, head_dim=8)
    assert router.config.tau == cfg.router.tau_start
    assert TargetSchedule(end=cfg.objective.target, start=cfg.objective.target_start,
                          ramp_steps=cfg.objective.ramp_steps, per_task=dict(cfg.objective.per_task))


def test_sweep_overrides_expand_and_every_job_composes(tmp_path):
    sweep = ["sparse.window=128,256", "objective.target=0.3,0.5", "router.tau_start=1.0,1.5"]
    parsed = OverridesParser.create().parse_overrides(sweep)
    assert all(o.is_sweep_override() for o in parsed)
    grid = [[f"{o.key_or_group}={v}" for v in o.sweep_string_iterator()] for o in parsed]
    jobs = list(itertools.product(*grid))
    assert len(jobs) == 8
    seen = set()
    for job in jobs:
        cfg = compose_train([*job, f"output_dir={tmp_path}"])
        seen.add((cfg.sparse.window, cfg.objective.target, cfg.router.tau_start))
        assert build_pattern(cfg).window == cfg.sparse.window
    assert seen == set(itertools.product([128, 256], [0.3, 0.5], [1.0, 1.5]))


PATTERN_SWEEP = "sparse=streaming,triangle,xattn"


def test_pattern_sweep_composes_each_pattern_with_its_defaults(tmp_path):
    """`-m sparse=streaming,triangle,xattn`: each job gets its pattern's config; the CPU quickstart's sink/window
    land only on patterns that have them, and explicit sparse.* overrides win."""
    parsed = OverridesParser.create().parse_overrides([PATTERN_SWEEP])[0]
    built = {}
    for name in parsed.sweep_string_iterator():
        cfg = compose_train([f"sparse={name}", f"output_dir={tmp_path}"])
        built[name] = build_pattern(cfg)
    assert built["streaming"].describe() == {"pattern": "streaming", "sink": 64, "window": 256}
    assert built["triangle"].describe() == {"pattern": "triangle", "sink": 64, "window": 256, "last_q": 64}
    assert built["xattn"].describe() == {"pattern": "xattn", "block_size": 128, "stride": 8, "threshold": 0.9,
                                         "density": None}
    cfg = compose_train(["sparse=triangle", "sparse.last_q=7", "sparse.window=33", f"output_dir={tmp_path}"])
    assert build_pattern(cfg).describe() == {"pattern": "triangle", "sink": 64, "window": 33,
                                                        "last_q": 7}


@pytest.mark.parametrize(("overrides", "message"), [
    (["sparse=xattn", "sparse.block_size=100"], r"xattn block_size must be a power of two >= 16, got 100"),
    (["sparse=xattn", "sparse.threshold=1.5"], r"xattn threshold must lie in \(0, 1\], got 1.5"),
    (["sparse=xattn", "sparse.stride=0"], r"xattn stride must be an integer >= 1, got 0"),
    (["sparse=triangle", "sparse.last_q=-1"], r"triangle last_q must be an integer >= 0, got -1"),
    (["sparse=xattn", "+sparse.window=64"], r"'xattn' got unknown parameter\(s\) \['window'\]"),
])
def test_bad_pattern_settings_fail_before_the_model_loads(tmp_path, overrides, message):
    cfg = compose_train(overrides + ["backbone.source=/nonexistent/model", f"output_dir={tmp_path}"])
    with pytest.raises(PatternError, match=message):
        flux.train.run(cfg)


def test_global_router_config_composes():
    cfg = compose_train(["router=global", "output_dir=unused"])
    assert (cfg.router.kind, cfg.router.read_layer, list(cfg.router.hidden)) == ("global", 1, [256])
    assert (cfg.router.tau_start, cfg.router.tau_end, cfg.router.lr) == (1.5, 1.0, 1e-3)  # inherited from mlp
    router = flux.train.build_router(cfg, num_layers=30, head_dim=64)
    assert router.config.kind == "global" and len(router.mlps) == 1
    assert router.mlps[0][-1].out_features == 2 * 30


def test_launchers_compose():
    default = compose_train(["output_dir=unused"], hydra_config=True)
    assert default.hydra.launcher._target_ == "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
    slurm = compose_train(["hydra/launcher=submitit_slurm", "output_dir=unused"], hydra_config=True)
    launcher = slurm.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (1, 8, 8)


def cli_env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false"}


def test_cli_prints_the_slurm_launcher_config(tmp_path):
    """`python -m flux.train ... --cfg hydra` finds conf/ from the entry point and shows the launcher."""
    proc = subprocess.run([sys.executable, "-m", "flux.train", "hydra/launcher=submitit_slurm", "--cfg", "hydra"],
                          check=False, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = OmegaConf.create(proc.stdout)
    assert printed.hydra.launcher.gpus_per_node == 8
    assert printed.hydra.runtime.choices["hydra/launcher"] == "submitit_slurm"


# -- slow: the real backbone, multirun and DDP -------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
    """3 training steps on SmolLM2 through `run`, keeping the backbone and router objects and their initial
    weights (wrapped builders), so the test can compare before / after."""
    out = tmp_path_factory.mktemp("smollm2_run")
    captured: dict = {}
    build_backbone, build_router = flux.train.build_backbone, flux.train.build_router

    def backbone_spy(cfg, device=None):
        backbone = captured["backbone"] = build_backbone(cfg, device=device)
        captured["backbone_before"] = {k: v.detach().clone() for k, v in backbone.model.state_dict().items()}
        return backbone

    def router_spy(cfg, num_layers, head_dim):
        router = captured["router"] = build_router(cfg, num_layers, head_dim)
        captured["router_before"] = {k: v.detach().clone() for k, v in router.state_dict().items()}
        return router

    cfg = compose_train([*SMALL_DATA, "trainer.max_steps=3", "trainer.limit_val_batches=0", "checkpoint_every=3",
                         "routing_map_every=3", f"output_dir={out}"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(flux.train, "build_backbone", backbone_spy)
        mp.setattr(flux.train, "build_router", router_spy)
        result = flux.train.run(cfg)
    return result, captured


@pytest.mark.slow
def test_smollm2_run_trains_only_the_router(smollm2_run):
    result, captured = smollm2_run
    assert result["global_step"] == 3
    router = captured["router"]
    changed = [k for k, v in router.state_dict().items() if not torch.equal(v, captured["router_before"][k])]
    assert changed, "three optimiser steps left every router weight unchanged"
    backbone_after = captured["backbone"].model.state_dict()
    assert backbone_after.keys() == captured["backbone_before"].keys()
    for key, before in captured["backbone_before"].items():
        assert torch.equal(backbone_after[key], before), key
    assert not any(p.requires_grad for p in captured["backbone"].model.parameters())


@pytest.mark.slow
def test_smollm2_run_logs_and_exports(smollm2_run):
    result, captured = smollm2_run
    tau = metric_rows(result["output_dir"], "train/tau")
    assert sorted(tau) == [0, 1, 2]
    for step, value in tau.items():
        assert value == pytest.approx(cosine_tau(step, 3, 1.5, 1.0, 0.6), abs=1e-6)
    loaded, meta = load_router(result["router_dir"], captured["backbone"])
    assert meta["backbone"] == SMOLLM2_NAME and meta["num_layers"] == 30
    assert meta["training"]["steps"] == 3
    for k, v in captured["router"].state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.float())

    # the reloaded router decides exactly as the trained one on the same input
    backbone = captured["backbone"]
    model = FluxModel(backbone, pattern=build_pattern(compose_train(SMALL_DATA + ["output_dir=unused"])))
    ids = backbone.tokenizer("The archive lists " + "old maps, letters and ledgers; " * 5,
                             return_tensors="pt")["input_ids"]
    logits = []
    with torch.no_grad():
        for router in (captured["router"].eval(), loaded):
            plan = router.as_plan()
            out = model(ids, torch.ones_like(ids), plan=plan)
            logits.append((out.decisions, plan.logits))
    assert torch.equal(logits[0][0], logits[1][0])
    for i in range(30):
        assert torch.equal(logits[0][1][i], logits[1][1][i])


@pytest.mark.slow
def test_multirun_sweep_trains_one_router_per_job_each_in_its_own_wandb_run(tiny_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    overrides = [o for o in tiny_overrides(tiny_dir, None) if o != "logger=csv"]
    cmd = [sys.executable, "-m", "flux.train", "-m", *overrides, "logger=wandb", "trainer.max_steps=1",
           "trainer.limit_val_batches=0", "objective.target=0.3,0.5", f"hydra.sweep.dir={sweep_dir}"]
    proc = subprocess.run(cmd, check=False, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "will reuse" not in proc.stdout + proc.stderr
    run_ids = set()
    for job, target in (("0", 0.3), ("1", 0.5)):
        overrides = OmegaConf.load(sweep_dir / job / ".hydra" / "overrides.yaml")
        assert f"objective.target={target}" in overrides
        _, meta = load_router(sweep_dir / job / "router")
        assert meta["num_layers"] == TINY_LAYERS
        assert meta["training"]["steps"] == 1
        (run_dir,) = (sweep_dir / job / "wandb").glob("offline-run-*")  # each job has its own run
        facts, config, summary = wandb_run_summary(run_dir)
        run_ids.add(facts["id"])
        assert facts["group"] == "sweep"  # grouped by the sweep folder's name
        assert f"objective.target={target}" in facts["name"] and str(tiny_dir) not in facts["name"]
        assert config["objective"]["target"] == target and config["trainer"]["max_steps"] == 1  # the resolved config
        assert config["output_dir"] == str(sweep_dir / job)
        assert summary["train/target"] == 0.0  # its one step is step 0 of the ramp, which starts at target_start=0
        assert "train/loss" in summary and "train/sparsity_hard" in summary  # final metrics in the summary
    assert len(run_ids) == 2


@pytest.mark.slow
def test_training_killed_with_sigkill_resumes_from_its_last_checkpoint(tiny_dir, tmp_path):
    """kill -9 in the middle of a run leaves whole checkpoints (atomic writes), and resume= continues from the last."""
    import signal
    import time

    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "flux.train", *tiny_overrides(tiny_dir, None), "trainer.max_steps=500",
           "checkpoint_every=1", "trainer.limit_val_batches=0", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        # step 4's file exists only after last.ckpt was rewritten for step 3, so the kill finds last.ckpt >= 3
        while not (run_dir / "checkpoints" / "step000004.ckpt").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    last = run_dir / "checkpoints" / "last.ckpt"
    step = load_ckpt(last)["global_step"]
    assert 3 <= step < 500 and not (run_dir / "router").exists()
    result = flux.train.run(compose_train(tiny_overrides(tiny_dir, tmp_path / "resumed") + [
        f"trainer.max_steps={step + 2}", "checkpoint_every=1", "trainer.limit_val_batches=0", f"resume={last}"]))
    assert (result["global_step"], result["steps_this_run"], result["resumed_from"]) == (step + 2, 2, step)
    resumed = load_ckpt(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert adam_steps(resumed) == {float(step + 2)}
    meta = load_router(result["router_dir"])[1]
    assert meta["num_layers"] == TINY_LAYERS and meta["training"]["steps"] == step + 2


@pytest.mark.slow
def test_multirun_over_patterns_records_each_pattern(tiny_dir, tmp_path):
    """`python -m flux.train -m sparse=streaming,triangle,xattn` trains one router per pattern; each router.json
    records its pattern and parameters."""
    sweep_dir = tmp_path / "sweep"
    data = [o for o in tiny_overrides(tiny_dir, None) if not o.startswith("sparse.")]
    cmd = [sys.executable, "-m", "flux.train", "-m", *data, "trainer.max_steps=1", "trainer.limit_val_batches=0",
           PATTERN_SWEEP, f"hydra.sweep.dir={sweep_dir}"]
    proc = subprocess.run(cmd, check=False, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recorded = {}
    for job in ("0", "1", "2"):
        _, meta = load_router(sweep_dir / job / "router")
        assert meta["num_layers"] == TINY_LAYERS
        recorded[meta["sparse"]["pattern"]] = meta["sparse"]
        assert meta["training"]["steps"] == 1
    assert recorded == {"streaming": {"pattern": "streaming", "sink": 64, "window": 256},
                        "triangle": {"pattern": "triangle", "sink": 64, "window": 256, "last_q": 64},
                        "xattn": {"pattern": "xattn", "block_size": 128, "stride": 8, "threshold": 0.9,
                                  "density": None}}


@pytest.mark.slow
def test_ddp_with_two_cpu_processes_trains_and_exports(tiny_dir, tmp_path):
    run_dir = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "flux.train", *tiny_overrides(tiny_dir, None), "trainer=ddp",
           "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true", "trainer.max_steps=2",
           "trainer.limit_val_batches=1", "data.batch_size=1", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, check=False, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Starting with 2 processes" in proc.stdout + proc.stderr
    assert (run_dir / "train_ddp_process_1.log").is_file()  # rank 1 ran under the same Hydra run folder
    loaded, meta = load_router(run_dir / "router", load_backbone(str(tiny_dir)))
    assert meta["training"]["steps"] == 2
    ckpt = load_ckpt(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2
    assert not any(k.startswith(BACKBONE_PREFIX) for k in ckpt["state_dict"])
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"][f"router.{k}"])


# -- resume checks before fit -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def per_task_run(tiny_dir, tmp_path_factory):
    """Two steps with very different per-task targets, so each task's Lagrange multipliers differ."""
    out = tmp_path_factory.mktemp("per_task")
    flux.train.run(compose_train(tiny_overrides(tiny_dir, out) + [
        "trainer.max_steps=2", "checkpoint_every=1", "trainer.limit_val_batches=0",
        "+objective.per_task.niah_single=0.1", "+objective.per_task.fwe=0.9"]))
    return out / "checkpoints" / "last.ckpt"


def test_resume_with_reordered_tasks_keeps_each_tasks_multipliers(per_task_run, tiny_dir, tmp_path):
    saved = load_ckpt(per_task_run)
    assert saved["flux"]["tasks"] == TASKS
    by_name = {name: {k: float(saved["state_dict"][f"constraint.{k}"][i]) for k in ("lambda1", "lambda2")}
               for i, name in enumerate(TASKS)}
    assert by_name["niah_single"] != by_name["fwe"]  # otherwise a swap would go unnoticed
    reordered = list(reversed(TASKS))
    overrides = [o for o in tiny_overrides(tiny_dir, tmp_path) if not o.startswith("data.tasks=")]
    # lambda_lr=0 freezes the multipliers (a resumed run uses its own learning rates, not the saved ones), so the
    # resumed run's checkpoint shows exactly what it loaded
    result = flux.train.run(compose_train(overrides + [
        f"data.tasks=[{','.join(reordered)}]", "trainer.max_steps=3", "checkpoint_every=1",
        "trainer.limit_val_batches=0", "objective.lambda_lr=0", "+objective.per_task.niah_single=0.1",
        "+objective.per_task.fwe=0.9", f"resume={per_task_run}"]))
    assert (result["global_step"], result["steps_this_run"], result["resumed_from"]) == (3, 1, 2)
    resumed = load_ckpt(tmp_path / "checkpoints" / "last.ckpt")
    assert resumed["flux"]["tasks"] == reordered
    for i, name in enumerate(reordered):
        for k in ("lambda1", "lambda2"):
            assert float(resumed["state_dict"][f"constraint.{k}"][i]) == pytest.approx(by_name[name][k], abs=0)


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.tasks=[niah_single,fwe,cwe]"],
     (r"trained on tasks \['niah_single', 'fwe'\] but this run has \['niah_single', 'fwe', 'cwe'\] \(missing \[\], "
      r"new \['cwe'\]\)")),
    (["router.hidden=[64]"], r"another router config \(hidden: \[128\] in the checkpoint, \[64\] now\)"),
    (["router.pool_size=4"], r"another router config \(pool_size: 16 in the checkpoint, 4 now\)"),
    (["sparse.window=32"], r"another sparse pattern \(window: 16 in the checkpoint, 32 now\)"),
])
def test_resume_refuses_another_task_set_router_or_pattern(resumed, tiny_dir, tmp_path, overrides, message):
    from flux.resume import ResumeError

    last = Path(resumed[0]["output_dir"]) / "checkpoints" / "last.ckpt"
    cfg = compose_train(tiny_overrides(tiny_dir, tmp_path) + ["trainer.max_steps=3", f"resume={last}"] + overrides)
    with pytest.raises(ResumeError, match=message):
        flux.train.run(cfg)
    assert not (tmp_path / "checkpoints").exists()


def test_unreadable_resume_checkpoints_name_the_file(resumed, tmp_path):
    from flux.resume import ResumeError, read_checkpoint

    good = (Path(resumed[0]["output_dir"]) / "checkpoints" / "last.ckpt").read_bytes()
    cases = {"empty.ckpt": b"", "truncated.ckpt": good[: len(good) // 2], "garbage.ckpt": b"not a checkpoint " * 9}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(good)
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    expected = {
        "empty.ckpt": r"empty\.ckpt is empty \(0 bytes\); resume from another checkpoint",
        "truncated.ckpt": r"truncated\.ckpt is not a readable checkpoint \(truncated or corrupt",
        "garbage.ckpt": r"garbage\.ckpt is not a readable checkpoint \(truncated or corrupt",
        "plain.ckpt": r"plain\.ckpt is not a flux training checkpoint",
        "missing.ckpt": r"missing\.ckpt does not exist.*checkpoints in .*: empty\.ckpt, garbage\.ckpt",
        "run": r"run is a folder, not a checkpoint file; give the file, e\.g\. resume=.*run/checkpoints/last\.ckpt",
    }
    for name, message in expected.items():
        with pytest.raises(ResumeError, match=message):
            read_checkpoint(tmp_path / name)
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt").step == 2


def test_resume_at_max_steps_exports_the_checkpoints_router_and_says_so(resumed, tiny_dir, tmp_path):
    last = Path(resumed[0]["output_dir"]) / "checkpoints" / "last.ckpt"
    result = flux.train.run(compose_train(tiny_overrides(tiny_dir, tmp_path) + ["trainer.max_steps=2",
                                                                                f"resume={last}"]))
    assert (result["global_step"], result["steps_this_run"], result["exported"]) == (2, 0, True)
    line = flux.train.summary_line(result)
    assert "already at step 2 >= trainer.max_steps=2: nothing left to train" in line
    assert line.endswith(f"exported its router to {tmp_path / 'router'}")
    loaded, meta = load_router(tmp_path / "router", load_backbone(str(tiny_dir)))
    assert meta["training"]["steps"] == 2 and meta["sparse"] == {"pattern": "streaming", "sink": 4, "window": 16}
    for k, v in router_state(load_ckpt(last)).items():
        assert torch.equal(loaded.state_dict()[k], v.float())
    assert not (tmp_path / "checkpoints").exists()  # nothing was trained


def test_summary_line_counts_the_steps_of_this_run(resumed):
    first, second = resumed
    assert flux.train.summary_line(first) == f"router exported to {first['router_dir']} after 2 steps (2 in this run)"
    assert flux.train.summary_line(second) == (f"router exported to {second['router_dir']} after 3 steps "
                                               "(1 in this run, resumed from step 2)")


def test_checkpoint_every_null_trains_without_checkpoints(tiny_dir, tmp_path):
    result = flux.train.run(compose_train(tiny_overrides(tiny_dir, tmp_path) + [
        "trainer.max_steps=1", "checkpoint_every=null", "trainer.limit_val_batches=0"]))
    assert result["exported"] and not (tmp_path / "checkpoints").exists()
    assert (tmp_path / "router" / "router.json").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_accelerator_without_cuda_fails_before_the_model_loads(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(flux.train, "build_backbone", lambda cfg: pytest.fail("the backbone loaded"))
    with pytest.raises(ConfigError, match=r"trainer.accelerator=gpu but no CUDA device is visible; use "
                                          r"trainer.accelerator=cpu"):
        flux.train.run(compose_train(tiny_overrides(tiny_dir, tmp_path) + ["trainer.accelerator=gpu"]))


def test_per_task_typo_lists_the_valid_task_names(tiny_dir, tmp_path):
    cfg = compose_train(tiny_overrides(tiny_dir, tmp_path) + ["+objective.per_task.nah_single=0.3"])
    with pytest.raises(ObjectiveError, match=r"objective.per_task names task\(s\) \['nah_single'\] that the data "
                                             r"does not have; valid task names: niah_single, fwe"):
        flux.train.run(cfg)


def test_short_runs_and_wide_windows_warn(tiny_dir, tmp_path):
    from flux.errors import FluxWarning

    cfg = compose_train(tiny_overrides(tiny_dir, tmp_path) + ["trainer.max_steps=1", "trainer.limit_val_batches=0",
                                                              "sparse.window=4096"])
    with pytest.warns(FluxWarning) as caught:
        flux.train.run(cfg)
    messages = [str(w.message) for w in caught if issubclass(w.category, FluxWarning)]
    assert any("trainer.max_steps=1 < objective.ramp_steps=10: the sparsity target stops at 0" in m for m in messages)
    assert any("sink 4 + window 4096 covers every prompt" in m and "saves no KV memory" in m for m in messages)


# -- a run that ends with its evaluation; targets per task type; resume=auto ------------------------------------

EVAL = ["eval=ruler", "eval.task.tasks=[niah_single,fwe]", "eval.task.lengths=[256]", "eval.task.n=2",
        "eval.task.max_new_tokens=4", "eval.batch_size=4"]


def test_a_run_ends_by_evaluating_its_router_then_a_rerun_with_resume_auto_does_nothing(tiny_dir, tmp_path):
    from flux.evals import read_results
    from flux.resume import ResumeError
    from flux.router import file_sha256

    overrides = tiny_overrides(tiny_dir, tmp_path) + ["trainer.max_steps=2", "checkpoint_every=1", "resume=auto",
                                                      *EVAL]
    result = flux.train.run(compose_train(overrides), overrides=["objective.target=0.5"])
    results = read_results(tmp_path / "eval")
    assert result["evaluation"] == results and results["routing"] == "router"
    assert {row["task"] for row in results["results"]} == {"ruler/niah_single", "ruler/fwe"}
    provenance = results["provenance"]
    assert provenance["overrides"] == ["objective.target=0.5"]  # the caller's: no Hydra run here
    assert provenance["checkpoint"] == {"source": str(tmp_path / "router"),
                                        "weights_sha256": file_sha256(tmp_path / "router" / "router.safetensors")}
    assert provenance["seeds"] == {"eval": 0, "train": 0, "train_data": 1000}
    _, meta = load_router(tmp_path / "router")
    assert meta["evaluation"] == results and meta["training"]["steps"] == 2  # the card keeps both
    assert "## Evaluation" in (tmp_path / "router" / "README.md").read_text()
    assert "ruler/niah_single" in (tmp_path / "router" / "README.md").read_text()
    text = flux.train.summary_text(result)
    assert f"evaluation   {tmp_path / 'eval'}  score {results['summary']['score']:.3f}" in text
    assert flux.train.evaluation_metrics(results)["eval/sparsity"] == results["summary"]["sparsity"]
    assert flux.train.summary_line(result).endswith(f"; evaluated it into {tmp_path / 'eval'}")

    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    again = flux.train.run(compose_train(overrides))  # finished: nothing trains, nothing is rewritten
    assert again["note"].endswith("already holds this run's router (2 steps) and its evaluation; nothing left to do "
                                  "(resume=auto)")
    assert again["evaluation"] == results and again["steps_this_run"] == 0
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files
    with pytest.raises(ResumeError, match=r"another router config \(hidden: \[128\] in the checkpoint, \[32\] now\)"):
        flux.train.run(compose_train(overrides + ["router.hidden=[32]"]))  # the folder belongs to another run


def test_resume_auto_continues_a_cut_off_run_and_its_evaluation(tiny_dir, tmp_path):
    from flux.evals import read_results

    plain = tiny_overrides(tiny_dir, tmp_path) + ["checkpoint_every=1", "resume=auto"]
    base = plain + EVAL
    fresh = flux.train.run(compose_train(plain + ["trainer.max_steps=1"]))  # nothing to resume: starts fresh
    assert fresh["resumed_from"] is None and fresh["evaluation"] is None
    longer = flux.train.run(compose_train(base + ["trainer.max_steps=2"]))  # continues from checkpoints/last.ckpt
    assert (longer["resumed_from"], longer["global_step"], longer["steps_this_run"]) == (1, 2, 1)
    (tmp_path / "eval" / "results.json").unlink()  # an evaluation cut off before its end
    kept = (tmp_path / "eval" / "routing.jsonl").read_bytes()
    done = flux.train.run(compose_train(base + ["trainer.max_steps=2"]))
    assert "already at step 2" in done["note"] and (tmp_path / "eval" / "routing.jsonl").read_bytes() == kept
    assert done["evaluation"] == read_results(tmp_path / "eval") == longer["evaluation"]
    _, meta = load_router(tmp_path / "router")
    assert meta["training"] == longer["summary"] | {"final_metrics": meta["training"]["final_metrics"]}
    assert "sparsity" in meta["training"]  # exporting the same weights again kept what the run recorded


def test_targets_per_task_type(tiny_dir, tmp_path):
    cfg = compose_train(tiny_overrides(tiny_dir, tmp_path) + [
        "trainer.max_steps=1", "trainer.limit_val_batches=0", "objective.ramp_steps=0",
        "+objective.per_type.retrieval=0.2", "+objective.per_type.holistic=0.7"])
    result = flux.train.run(cfg)
    assert result["summary"]["targets"] == {"niah_single": 0.2, "fwe": 0.7}
    cfg = compose_train(tiny_overrides(tiny_dir, tmp_path / "b") + [
        "trainer.max_steps=1", "trainer.limit_val_batches=0", "objective.ramp_steps=0",
        "+objective.per_type.retrieval=0.2", "+objective.per_task.niah_single=0.4"])
    assert flux.train.run(cfg)["summary"]["targets"] == {"niah_single": 0.4, "fwe": 0.5}  # per_task wins


@pytest.mark.parametrize(("overrides", "message"), [
    (["+objective.per_type.needle=0.3"], r"objective.per_type names task type\(s\) \['needle'\]; use retrieval"),
    (["+objective.per_type.retrieval=1.5"], r"objective.per_type.retrieval=1.5 must be a fraction"),
    ([*EVAL, "eval.task.lengths=[4096]"], r"the task needs 4096 positions but backbone .* has 2048"),
    ([*EVAL, "eval.batch_size=0"], r"eval.batch_size=0 must be a positive integer"),
])
def test_bad_targets_and_evaluations_fail_before_training(tiny_dir, tmp_path, overrides, message):
    with pytest.raises(FluxUserError, match=message):
        flux.train.run(compose_train(tiny_overrides(tiny_dir, tmp_path) + overrides))
    assert not (tmp_path / "checkpoints").exists()
