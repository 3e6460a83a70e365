"""The ablation sweeps (experiments/ablations): their recipe is smollm2_8k's plus what it says it changes, every job
of every sweep composes into a config flux.train accepts, and one sweep runs end to end through run_all.sh --tiny on
the CPU (training jobs with their in-run evaluation and W&B runs, the baselines, the table and the Pareto figure)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from config_tools import leaves
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from wandb_files import wandb_run_summary

import flux.train
from flux.conf import CONFIG_MODULE
from flux.configs import build_pattern
from flux.data.synthetic import TASKS
from flux.evals import read_results
from flux.router import file_sha256, load_router

REPO = Path(__file__).resolve().parents[1]
RUN_ALL = REPO / "experiments" / "ablations" / "run_all.sh"
# What ablation_base says it changes in the smollm2_8k recipe (its header comment), and nothing else.
STATED_CHANGES = {"data.tasks", "objective.per_task", "objective.per_type", "attention.sa_backend", "resume", "logger"}


def compose_train(overrides: list[str]):
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        return compose("train", overrides=[*overrides, "output_dir=unused"])


def sweep_lines() -> list[tuple[str, str]]:
    proc = subprocess.run(["bash", str(RUN_ALL), "--list"], capture_output=True, text=True, check=True)
    return [tuple(line.split("\t")) for line in proc.stdout.splitlines()]


def test_ablation_recipe_is_smollm2_8k_with_its_stated_changes():
    recipe = OmegaConf.to_container(compose_train(["+experiment=smollm2_8k"]), resolve=True)
    ablation = OmegaConf.to_container(compose_train(["+experiment=ablation_base"]), resolve=True)
    a, b = dict(leaves(recipe)), dict(leaves(ablation))
    changed = {k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>")}
    sections = {next((s for s in STATED_CHANGES if k == s or k.startswith(s + ".")), k) for k in changed}
    assert sections == STATED_CHANGES
    assert ablation["logger"]["_target_"] == "lightning.pytorch.loggers.WandbLogger" and ablation["logger"]["offline"]
    assert recipe["eval"] == ablation["eval"] and ablation["eval"]["task"]["haystack"] == "text"
    held_out = set(ablation["eval"]["task"]["tasks"]) - set(ablation["data"]["tasks"])
    assert held_out == {"niah_multiquery", "continuation"}  # tasks the ablation routers never train on
    assert set(ablation["data"]["tasks"]) < set(recipe["data"]["tasks"])
    # the per-type targets give every trained task smollm2_8k's own target
    per_type = ablation["objective"]["per_type"]
    for task in ablation["data"]["tasks"]:
        ours = per_type.get(TASKS[task].task_type, ablation["objective"]["target"])
        assert ours == recipe["objective"]["per_task"].get(task, recipe["objective"]["target"]), task


def test_every_job_of_every_sweep_composes_into_a_config_training_accepts():
    lines = sweep_lines()
    assert {sweep for sweep, _ in lines} == {"target", "tau", "pooling", "router", "objective", "pattern"}
    parser = OverridesParser.create()
    jobs = 0
    for sweep, line in lines:
        parsed = parser.parse_overrides(line.split())
        grid = [[o.input_line] if not o.is_sweep_override() else
                [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] for o in parsed]
        combos = [[]]
        for options in grid:
            combos = [c + [o] for c in combos for o in options]
        for combo in combos:
            cfg = compose_train(["+experiment=ablation_base", *combo])
            OmegaConf.resolve(cfg)
            pattern = build_pattern(cfg)
            router = flux.train.build_router(cfg, num_layers=30, head_dim=64)
            flux.train.build_target(cfg)
            assert cfg.eval.task.haystack == "text" and cfg.resume == "auto", (sweep, combo)
            if sweep == "pattern":
                assert pattern.describe()["pattern"] in ("triangle", "xattn")
            if sweep == "pooling":
                assert router.config.pooling in ("first_last", "question", "first_token", "mean")
            jobs += 1
    assert jobs == 29  # the device-time estimate in experiments/ablations/README.md counts these and the base job


@pytest.mark.slow
def test_one_ablation_sweep_runs_end_to_end_in_tiny_mode(tiny_dir, tmp_path):
    """run_all.sh --tiny objective: the base job, the baselines, the sweep's job and its table, on the CPU."""
    out = tmp_path / "ablations"
    env = {**os.environ, "PYTHON": sys.executable, "TINY_BACKBONE": str(tiny_dir), "WANDB_MODE": "offline"}
    proc = subprocess.run(["bash", str(RUN_ALL), "--tiny", "--out", str(out), "objective"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = out / "runs"
    job = runs / "objective" / "+experiment=ablation_tiny,objective=distill"
    base = runs / "base" / "+experiment=ablation_tiny"

    # each training job ended with its evaluation on the split, with provenance naming the job and its router
    results = read_results(job / "eval")
    provenance = results["provenance"]
    assert provenance["overrides"] == ["+experiment=ablation_tiny", f"backbone.source={tiny_dir}", "objective=distill"]
    assert provenance["checkpoint"] == {"source": str(job / "router"),
                                        "weights_sha256": file_sha256(job / "router" / "router.safetensors")}
    assert provenance["seeds"] == {"eval": 7, "train": 0, "train_data": 1000}
    assert provenance["task"]["haystack"] == "text" and "continuation" in provenance["task"]["tasks"]
    lines = [json.loads(x) for x in (job / "eval" / "routing.jsonl").read_text().splitlines()]
    assert len(lines) == sum(row["n"] for row in results["results"]) == 9
    assert all("prediction" in x and x["answers"] for x in lines)
    assert all("needle_distance_tokens" in x["meta"] for x in lines if x["task"] == "ruler/niah_single")
    # the router's card carries the evaluation, and the job's own W&B run its summary
    _, meta = load_router(job / "router")
    assert meta["evaluation"] == results and meta["training"]["steps"] == 2
    (wandb_run,) = (job / "wandb").glob("offline-run-*")
    facts, config, summary = wandb_run_summary(wandb_run)
    assert facts["group"] == "objective" and "objective=distill" in facts["name"]
    assert config["objective"]["distill_weight"] == 1.0
    assert summary["eval/score"] == pytest.approx(results["summary"]["score"])
    assert summary["eval/sparsity"] == pytest.approx(results["summary"]["sparsity"])
    assert "eval/ruler/niah_single/score" in summary and "train/loss" in summary
    assert not (job / "checkpoints").exists()  # a finished job keeps its router and evaluation, not its checkpoints

    # baselines on the base job's split and pattern
    for name, routing in (("dense", "dense"), ("sparse", "sparse"), ("random_0.5", "random"),
                          ("first_dense_0.5", "first_dense")):
        baseline = read_results(runs / "baselines" / name)
        assert baseline["routing"] == routing and baseline["provenance"]["task"] == provenance["task"]
        assert baseline["sparse"] == read_results(base / "eval")["sparse"] == {"pattern": "streaming", "sink": 4,
                                                                                "window": 16}

    # the table: commands on top, rows labelled by the swept value, the figure beside it
    page = (out / "objective.md").read_text(encoding="utf-8")
    assert page.startswith("# Ablation: objective\n\n```bash\nbash experiments/ablations/run_all.sh --tiny objective\n")
    assert f"python -m flux.train -m +experiment=ablation_tiny backbone.source={tiny_dir} objective=distill" in page
    for label in ("Router [objective=distill]", "Router [no swept override]", "Dense (all FA)", "All SA",
                  "Random (Ω=0.67)", "First-k dense (Ω=0.33)"):
        assert f"| {label} |" in page, label
    assert "![score vs sparsity](objective/pareto.png)" in page and (out / "objective" / "pareto.png").is_file()
    assert str(wandb_run) in page


def test_a_spent_budget_stops_before_starting_a_command_and_says_how_to_continue(tiny_dir, tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "TINY_BACKBONE": str(tiny_dir)}
    proc = subprocess.run(["bash", str(RUN_ALL), "--tiny", "--budget", "1", "--out", str(tmp_path), "objective"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "[base] out of time (--budget): rerun to continue" in proc.stdout
    assert not (tmp_path / "runs" / "base").exists() or not any((tmp_path / "runs" / "base").glob(".done-*"))
    bad = subprocess.run(["bash", str(RUN_ALL), "--list", "nosuch"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "unknown sweep 'nosuch' — choose from: target tau pooling" in bad.stderr
