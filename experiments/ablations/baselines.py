"""Evaluate the baselines of an ablation's tables on exactly the split and sparse pattern its routers were evaluated
on: every layer on FA, every layer on SA, and seeded random / first-k-dense plans at a few sparsity levels.

    python experiments/ablations/baselines.py RUN_DIR OUT_DIR [--levels 0.3,0.45,0.6,0.75]

RUN_DIR is a flux.train job folder of the sweep (e.g. the base recipe's): its `.hydra/config.yaml` gives the
backbone, the `eval` group, the sparse pattern, the attention backends and the device, through the same
`flux.train.evaluation_config` its in-run evaluation used; its router.json gives the layer count (first-k-dense at a
level keeps round((1 - level) * layers) layers on FA). Each baseline goes to OUT_DIR/<name> (dense, sparse,
random_<level>, first_dense_<level>) with flux.evaluate's results.json and routing.jsonl, all in this one process.
A baseline whose results.json exists is complete (flux.evaluate writes it last) and is skipped; one cut off midway
resumes from its routing.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from flux.evals.results import RESULTS_FILE
from flux.evaluate import evaluate
from flux.router import META_FILE
from flux.train import evaluation_config


def baseline_routings(levels: list[float], num_layers: int) -> dict[str, dict]:
    """name -> routing settings of every baseline."""
    routings: dict[str, dict] = {"dense": {"mode": "dense"}, "sparse": {"mode": "sparse"}}
    for level in levels:
        routings[f"random_{level:g}"] = {"mode": "random", "sparsity": level, "seed": 0}
        routings[f"first_dense_{level:g}"] = {"mode": "first_dense", "k": round((1.0 - level) * num_layers)}
    return routings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a flux.train job folder (with .hydra/config.yaml and router/)")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--levels", default="0.3,0.45,0.6,0.75", help="sparsity levels of the random/first-k plans")
    args = parser.parse_args(argv)
    config_file = args.run_dir / ".hydra" / "config.yaml"
    meta_file = args.run_dir / "router" / META_FILE
    for needed in (config_file, meta_file):
        if not needed.is_file():
            parser.error(f"{needed} not found; give a flux.train job folder whose run has finished")
    levels = [float(x) for x in args.levels.split(",") if x.strip()]
    if not all(0.0 <= x <= 1.0 for x in levels):
        parser.error(f"--levels {args.levels}: every level must be a sparsity in [0, 1]")
    train_cfg = OmegaConf.load(config_file)
    num_layers = int(json.loads(meta_file.read_text(encoding="utf-8"))["num_layers"])
    for name, routing in baseline_routings(levels, num_layers).items():
        out = args.out_dir / name
        if (out / RESULTS_FILE).is_file():
            print(f"{name}: done before ({out / RESULTS_FILE})")
            continue
        overrides = [f"routing.{key}={value}" for key, value in routing.items()]
        evaluate(evaluation_config(train_cfg, routing, out), overrides=overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
