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
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

import flux.train
from flux.attention.patterns import PatternError
from flux.backbone import SMOLLM2_NAME, load_backbone
from flux.conf import CONFIG_MODULE
from flux.configs import build_pattern
from flux.data.module import FluxDataModule
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
    (["sparse.name=nope"], PatternError, r"unknown sparse pattern 'nope'; registered patterns: streaming"),
    (["objective.target=-0.3"], ObjectiveError, r"end=-0\.3 must lie in \[0, 1\]"),
    (["router.tau_start=0"], RouterConfigError, r"tau must be > 0, got 0\.0"),
    (["router.tau_end=-1"], RouterConfigError, r"tau_end=-1\.0"),
    (["data=jsonl", "data.train_files=[/nonexistent/train.jsonl]"], FileNotFoundError,
     r"data file '/nonexistent/train\.jsonl' does not exist"),
])
def test_bad_settings_fail_before_training_with_a_clear_message(tiny_dir, tmp_path, overrides, error, message):
    synthetic = "data=jsonl" not in overrides  # the small synthetic settings do not exist in the jsonl data config
    cfg = compose_train(tiny_overrides(tiny_dir, tmp_path, synthetic) + overrides)
    with pytest.raises(error, match=message):
        flux.train.run(cfg)
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
                   "data.length_tokens": [32768, 65536, 131072], "data.max_tokens": 132000,
                   "objective.target": 0.5, "sparse.window": 4096, "gradient_checkpointing": True},
    "smollm2_8k": {"backbone.source": "smollm2_135m", "trainer.accelerator": "gpu", "trainer.devices": 1,
                   "data.length_tokens": [1024, 2048, 4096], "logger._target_": "lightning.pytorch.loggers.CSVLogger"},
}


def leaves(node, prefix: str = ""):
    """(dotted key, value) of every leaf of a plain nested dict."""
    for key, value in node.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


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

    def backbone_spy(cfg):
        backbone = captured["backbone"] = build_backbone(cfg)
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
def test_multirun_sweep_trains_one_router_per_job(tiny_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "flux.train", "-m", *tiny_overrides(tiny_dir, None), "trainer.max_steps=1",
           "trainer.limit_val_batches=0", "objective.target=0.3,0.5", f"hydra.sweep.dir={sweep_dir}"]
    proc = subprocess.run(cmd, check=False, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, target in (("0", 0.3), ("1", 0.5)):
        overrides = OmegaConf.load(sweep_dir / job / ".hydra" / "overrides.yaml")
        assert f"objective.target={target}" in overrides
        _, meta = load_router(sweep_dir / job / "router")
        assert meta["num_layers"] == TINY_LAYERS
        assert meta["training"]["steps"] == 1


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
