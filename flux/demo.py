"""`python -m flux.demo` (what `make demo` runs): the whole loop on the offline SmolLM2 backbone, sized for a CPU.

1. trains a per-layer router for a few steps on the synthetic task mixture (the CPU quickstart, shortened);
2. evaluates every layer on FA, every layer on SA, and the router on a fresh RULER-style split, and, when the
   repository ships a GPU-trained router (experiments/smollm2_8k/router), that one too;
3. writes the router's routing map (layer x sample, grouped by task) as a PNG and prints its path.
A few CPU minutes cannot train a good router: the shipped router is the one to judge quality by.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import matplotlib

from flux import viz
from flux.errors import ArgumentParser, ConfigError, run_cli

REPO = Path(__file__).resolve().parent.parent
SHIPPED_ROUTER = REPO / "experiments" / "smollm2_8k" / "router"  # present in a checkout, not in an installed wheel
TASKS = ["niah_single", "kv_lookup", "variable_tracking", "fwe", "continuation", "summary_like"]


def compose(config_name: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from flux.conf import CONFIG_MODULE

    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def run(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m flux.demo",
                            description="train -> evaluate -> routing map on SmolLM2, on CPU")
    parser.add_argument("--out", default="outputs/demo")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--length", type=int, default=768, help="prompt tokens of the evaluation split")
    parser.add_argument("--n", type=int, default=2, help="evaluation samples per task")
    args = parser.parse_args(argv)
    for name in ("steps", "length", "n"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name}={getattr(args, name)} must be a positive integer; see --help")
    matplotlib.use("Agg")
    out = Path(args.out).resolve()

    from flux.evaluate import evaluate
    from flux.train import run as train
    from flux.train import summary_text

    # The demo's prompts (512-768 tokens) need a window far below the default (StreamingPattern's), or SA would see
    # every token. These are the shipped router's values; every router runs its own pattern (its router.json) anyway.
    sparse = ["sparse.sink=64", "sparse.window=256"]
    print(f"[1/3] training a router for {args.steps} steps on CPU -> {out / 'train'}")
    trained = train(compose("train", sparse + [
        f"trainer.max_steps={args.steps}", "logger=csv", f"output_dir={out / 'train'}", f"data.tasks=[{','.join(TASKS)}]",
        "data.n_train=2", "data.n_val=1", "data.length_tokens=512", "data.max_tokens=768", "data.batch_size=2",
        "objective.ramp_steps=4", "objective.target=0.5", "checkpoint_every=4", "routing_map_every=4",
        "trainer.val_check_interval=4",
        "router.lr=5e-3"]))
    print(summary_text(trained))
    routers = {"router": trained["router_dir"]}
    if (SHIPPED_ROUTER / "router.safetensors").is_file():
        routers["shipped_router"] = str(SHIPPED_ROUTER)
    print(f"[2/3] evaluating on a fresh split: {len(TASKS)} tasks x {args.n} samples at {args.length} tokens")
    eval_common = sparse + ["eval=ruler", f"eval.task.tasks=[{','.join(TASKS)}]", f"eval.task.lengths=[{args.length}]",
                            f"eval.task.n={args.n}", "eval.task.seed=11", "eval.task.max_new_tokens=24",
                            "eval.batch_size=4"]
    runs = [("dense", ["routing.mode=dense"]), ("sparse", ["routing.mode=sparse"])]
    runs += [(name, ["routing.mode=router", f"routing.checkpoint={path}"]) for name, path in routers.items()]
    summary = {}
    for name, extra in runs:
        # a fresh folder: an evaluation folder resumes the run it holds, and this demo retrains its router each time
        shutil.rmtree(out / "eval" / name, ignore_errors=True)
        results = evaluate(compose("evaluate", eval_common + extra + [f"output_dir={out / 'eval' / name}"]))
        summary[name] = results["summary"]
    print("\n[summary] mean score and fraction of layers on sparse attention")
    for name, s in summary.items():
        print(f"  {name:<16} score {s['score']:.3f}   sparsity {s['sparsity']:.3f}")
    best = "shipped_router" if "shipped_router" in summary else "router"
    records = viz.load_routing(out / "eval" / best)
    fig = viz.routing_heatmap(records, title=f"SmolLM2 routing map ({best.replace('_', ' ')})")
    path = viz.save_figure(fig, out / "routing_map.png")
    print(f"[3/3] routing map written to {path}")


def main() -> None:
    run_cli(run)


if __name__ == "__main__":
    main()
