"""`python -m flux.evaluate`: score a backbone under one routing mode and write results.json + routing.jsonl.

Routing modes (`routing.mode=`): dense (every layer FA), sparse (every layer SA), router (a trained router from
`routing.checkpoint=PATH`), static (`routing.sa_layers=[...]`), first_dense (`routing.k` first layers FA, the rest SA),
random (a seeded random layer plan with `routing.sparsity` of the layers on SA, per sample). Everything that can be
checked before the model runs is checked first: settings, device, task and files, lengths against the model's
positions, the router files, the output folder.

Nothing is lost: each finished sample is appended to routing.jsonl (record, prediction, reference answers,
decisions, score), and rerunning the same command with the same `output_dir` continues from the samples already
there (flux.evals.progress); results.json is rebuilt from the complete routing.jsonl at the end.

A router runs with its own sparse pattern (the one in its router.json) unless `sparse.*` is set on the command line.

results.json records its provenance (flux.evals.provenance): the run's Hydra overrides, the router and the sha256 of
its weights, the seeds, the task's settings, the code's git commit and the date. `flux.train` calls `evaluate` in
its own process to end a run with the evaluation of the router it exported (the `eval` group of its config).
"""

from __future__ import annotations

import hashlib
import json
import random as _random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from flux.attention.patterns import SparsePattern, pattern_from_description
from flux.backbone import backbone_max_positions, load_backbone
from flux.conf import CONFIG_PATH
from flux.configs import build, build_pattern
from flux.data.prompting import build_prompt, collate_left_padded
from flux.errors import ConfigError, report_user_errors, run_cli
from flux.evals import PerplexityTask, aggregate, build_results, make_record, write_results
from flux.evals.progress import EvalProgress
from flux.evals.provenance import build_provenance, hydra_task_overrides, task_settings
from flux.evals.results import record_from_line
from flux.model import FluxModel
from flux.preflight import (
    check_device,
    check_sa_backend,
    check_writable_dir,
    check_writable_file,
    warn_if_window_covers,
)
from flux.router import check_router_files, file_sha256, load_router, read_router_meta

ROUTING_MODES = ("dense", "sparse", "router", "static", "first_dense", "random")
# Keys of the config that only say where results go: a resumed run may change them.
OUTPUT_KEYS = ("output_dir", "output")


class EvalConfigError(ConfigError):
    """A routing mode or its parameters do not fit the backbone."""


def layer_plan(mode: str, num_layers: int, routing: dict[str, Any]) -> list[bool] | None:
    """The static plan for every mode but `router` and `random` (those decide per sample)."""
    if mode == "dense":
        return [False] * num_layers
    if mode == "sparse":
        return [True] * num_layers
    if mode == "static":
        layers = list(routing.get("sa_layers") or [])
        bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < num_layers]
        if bad:
            raise EvalConfigError(f"routing.sa_layers has layer indices {bad} outside [0, {num_layers}); "
                                  "list the SA layers by index")
        return [i in set(layers) for i in range(num_layers)]
    if mode == "first_dense":
        k = routing.get("k")
        if not isinstance(k, int) or not 0 <= k <= num_layers:
            raise EvalConfigError(f"routing.k={k!r} must be an integer in [0, {num_layers}] (first k layers stay FA)")
        return [i >= k for i in range(num_layers)]
    return None


class RandomPlan:
    """Per-sample random layer plans with a fixed fraction of SA layers, seeded, for matched-sparsity baselines."""

    def __init__(self, num_layers: int, sparsity: float, seed: int) -> None:
        if not 0.0 <= sparsity <= 1.0:
            raise EvalConfigError(f"routing.sparsity={sparsity} must lie in [0, 1] for mode=random")
        self.num_layers, self.n_sa = num_layers, round(sparsity * num_layers)
        self.rng = _random.Random(seed)

    def draw(self, batch: int) -> torch.Tensor:
        plan = torch.zeros(batch, self.num_layers, dtype=torch.bool)
        for b in range(batch):
            plan[b, self.rng.sample(range(self.num_layers), self.n_sa)] = True
        return plan


def check_eval_group(cfg: DictConfig) -> None:
    """The `eval` group's own settings (also checked by flux.train before it trains a run that ends with one)."""
    batch_size = cfg.eval.get("batch_size", 1)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EvalConfigError(f"eval.batch_size={batch_size!r} must be a positive integer; e.g. eval.batch_size=8")


def build_task(cfg: DictConfig, max_positions: int, backbone: str) -> tuple[dict[str, Any], Any]:
    """(settings, task object) of `cfg.eval.task`, refused when its lengths need more positions than the backbone
    has (`max_positions`); no sample is generated yet."""
    task_cfg = OmegaConf.to_container(cfg.eval.task, resolve=True, throw_on_missing=True)
    task = build(task_cfg)
    needed = task.required_positions()
    if needed is not None and needed > max_positions:
        raise EvalConfigError(f"the task needs {needed} positions but backbone {backbone!r} has {max_positions}; "
                              "lower the lengths (e.g. eval.task.lengths) to fit")
    return task_cfg, task


def check_config(cfg: DictConfig) -> None:
    """The routing and evaluation settings on their own (layer indices are checked against the backbone later)."""
    mode = cfg.routing.mode
    if mode not in ROUTING_MODES:
        raise EvalConfigError(f"unknown routing mode {mode!r}; choose one of {', '.join(ROUTING_MODES)}")
    check_eval_group(cfg)
    routing = cfg.routing
    if mode == "static":
        layers = routing.get("sa_layers")
        if not layers:
            raise EvalConfigError("routing.mode=static needs routing.sa_layers=[...], the indices of the SA layers; "
                                  "use routing.mode=dense for no SA layer")
        bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or i < 0]
        if bad:
            raise EvalConfigError(f"routing.sa_layers has entries {bad} that are not layer indices; list the SA "
                                  "layers by index, e.g. routing.sa_layers=[1,3]")
    if mode == "first_dense":
        k = routing.get("k")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise EvalConfigError(f"routing.k={k!r} must be an integer >= 0 (the first k layers stay FA)")
    if mode == "random":
        sparsity = routing.get("sparsity")
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity <= 1.0:
            raise EvalConfigError(f"routing.sparsity={sparsity!r} must lie in [0, 1] for mode=random")
    if mode == "router":
        check_router_files(routing.get("checkpoint"))
    build_pattern(cfg)  # an unknown pattern or a bad parameter fails here, before any model loads


def explicit_sparse_overrides() -> list[str]:
    """The `sparse.*` (or `sparse=`) overrides the user typed on the command line of this Hydra run; [] outside one
    (compose(), a notebook), where the config's sparse section counts as not overridden."""
    overrides = hydra_task_overrides() or []
    return [o for o in overrides if o.lstrip("+~").split("=", 1)[0].split(".", 1)[0].split("@", 1)[0] == "sparse"]


def choose_pattern(configured: SparsePattern, router_meta: dict[str, Any] | None,
                   overrides: Sequence[str]) -> SparsePattern:
    """The pattern an evaluation runs: a router's own pattern (from its router.json) unless the user set sparse.*
    explicitly, which then wins with a one-line notice. Without a router, the configured pattern."""
    saved = (router_meta or {}).get("sparse")
    if not saved:
        return configured
    if overrides:
        if saved != configured.describe():
            print(f"notice: running sparse attention {configured.describe()} from the command line "
                  f"({' '.join(overrides)}) instead of the router's own {saved}", file=sys.stderr)
        return configured
    return pattern_from_description(saved)


# The parts of router.json that decide a router's decisions (the rest is its card: training summary, evaluation).
ROUTER_IDENTITY_KEYS = ("backbone_fingerprint", "num_layers", "head_dim", "router", "sparse")


def router_digest(checkpoint: str) -> str:
    """sha256 of what decides the router's decisions: its weights file and the settings router.json rebuilds it
    from. A resumed evaluation must run the same router, not one retrained there; the card's training summary and
    attached evaluation are left out, since attaching this evaluation to the router rewrites router.json."""
    weights, meta_path = check_router_files(checkpoint)
    meta = read_router_meta(meta_path)
    h = hashlib.sha256(weights.read_bytes())
    h.update(json.dumps({k: meta.get(k) for k in ROUTER_IDENTITY_KEYS}, sort_keys=True).encode())
    return h.hexdigest()


def evaluation_identity(cfg: DictConfig, pattern: SparsePattern) -> dict[str, Any]:
    """Everything that decides an evaluation's results (eval_config.json): the resolved config without the output
    paths, the sparse pattern that actually runs, and the router files' digest."""
    config = OmegaConf.to_container(cfg, resolve=True)
    for key in OUTPUT_KEYS:
        config.pop(key, None)
    identity = {"config": config, "pattern": pattern.describe()}
    if cfg.routing.mode == "router":
        identity["router_sha256"] = router_digest(cfg.routing.checkpoint)
    return identity


def evaluate(cfg: DictConfig, sparse_overrides: Sequence[str] | None = None, overrides: Sequence[str] | None = None,
             seeds: dict[str, int | None] | None = None) -> dict[str, Any]:
    """Run (or resume) the evaluation described by a composed config; returns the results dict (also on disk).

    `sparse_overrides`: the user's explicit sparse.* overrides (default: read from the Hydra command line).
    `overrides`: the overrides that define the run, for results.json's provenance (default: this Hydra run's; none
    outside Hydra). `seeds`: seeds of the caller to record beside the evaluation's own (e.g. a training run's)."""
    check_config(cfg)
    device = check_device(cfg.get("device"))
    check_sa_backend(cfg.attention.sa_backend, device.type)
    backbone_params = OmegaConf.to_container(cfg.backbone, resolve=True)
    backbone_params.pop("description", None)
    backbone_params["device"] = str(device)
    task_cfg, task = build_task(cfg, backbone_max_positions(**backbone_params), backbone_params["source"])
    mode = cfg.routing.mode
    meta = load_router(cfg.routing.checkpoint)[1] if mode == "router" else None
    explicit = explicit_sparse_overrides() if sparse_overrides is None else list(sparse_overrides)
    pattern = choose_pattern(build_pattern(cfg), meta, explicit)
    out_dir = check_writable_dir(cfg.output_dir, "output_dir")
    progress = EvalProgress(out_dir, evaluation_identity(cfg, pattern))
    done = progress.start()
    if cfg.get("output"):
        check_writable_file(cfg.output, "output")

    backbone = load_backbone(**backbone_params)
    router = None
    if mode == "router":
        router = load_router(cfg.routing.checkpoint, backbone)[0].to(backbone.device)
    fm = FluxModel(backbone, pattern=pattern, fa_backend=cfg.attention.fa_backend,
                   sa_backend=cfg.attention.sa_backend, router=router)
    routing = OmegaConf.to_container(cfg.routing, resolve=True)
    static = layer_plan(mode, backbone.num_layers, routing)
    rand = RandomPlan(backbone.num_layers, float(routing["sparsity"]), int(routing.get("seed", 0))) \
        if mode == "random" else None
    uses_sa = static is None or any(static)
    if isinstance(task, PerplexityTask):
        records = evaluate_ppl(fm, task, static, rand, router, progress, done, uses_sa)
    else:
        records = evaluate_generation(fm, task, static, rand, router, int(cfg.eval.get("batch_size", 1)),
                                      cfg.eval.get("max_input_tokens"), progress, done, uses_sa)
    results = build_results(backbone.name, mode, fm.pattern.describe(), aggregate(records),
                            run_provenance(cfg, task_cfg, overrides, seeds, progress.started))
    paths = [out_dir / "results.json"] + ([Path(cfg.output)] if cfg.get("output") else [])
    write_results(results, *paths)
    print_table(results)
    return results


def run_provenance(cfg: DictConfig, task_cfg: dict[str, Any], overrides: Sequence[str] | None,
                   seeds: dict[str, int | None] | None, started: str) -> dict[str, Any]:
    """results.json's provenance for this evaluation (see flux.evals.results for the shape)."""
    if overrides is None:
        overrides = hydra_task_overrides() or []
    checkpoint = None
    if cfg.routing.mode == "router":
        weights, _ = check_router_files(cfg.routing.checkpoint)
        checkpoint = {"source": str(cfg.routing.checkpoint), "weights_sha256": file_sha256(weights)}
    own = {"eval": task_cfg.get("seed")} if "seed" in task_cfg else {}
    if cfg.routing.mode == "random":
        own["routing"] = int(cfg.routing.get("seed", 0))
    return build_provenance(overrides=overrides, checkpoint=checkpoint, seeds={**own, **(seeds or {})},
                            task=task_settings(task_cfg), date=started)


def _plan_for(batch: int, static, rand, router, device):
    if static is not None:
        return static
    if rand is not None:
        return rand.draw(batch).to(device)
    return router.as_plan()


def _resumed(bar_desc: str, done: int, total: int) -> tqdm:
    if done:
        print(f"resuming: {done} of {total} samples already in routing.jsonl", file=sys.stderr)
    return tqdm(total=total, initial=done, desc=bar_desc, unit="sample")


def evaluate_generation(fm: FluxModel, task, static, rand, router, batch_size: int, max_input_tokens: int | None,
                        progress: EvalProgress, done: list[dict[str, Any]], uses_sa: bool = True) -> list:
    """Greedy generation in length-sorted batches; prompts are middle-truncated to fit the model (and
    `max_input_tokens` when set, as LongBench's protocol does). The batches are the same in a resumed run (so are
    the random plans drawn for them): a batch whose samples are all in `done` is skipped, and a batch cut short by
    an interruption runs again and appends only its missing samples. Returns every sample's record, in order."""
    tok = fm.backbone.tokenizer
    samples = task.samples(tok)
    budgets = [task.max_new_tokens(s) for s in samples]
    prompts = []
    for s, budget in zip(samples, budgets):
        fields = s.prompt_fields()
        limit = fm.backbone.max_positions - budget
        if max_input_tokens:
            limit = min(limit, int(max_input_tokens))
        prompts.append(build_prompt(tok, fields.context, fields.question, separator=fields.separator, chat=s.chat,
                                    max_tokens=limit, task=s.task, example_id=s.id))
    if uses_sa:
        warn_if_window_covers(fm.pattern, max(map(len, prompts)), "evaluation")
    order = sorted(range(len(samples)), key=lambda i: (len(prompts[i]), i))
    keys = [task.row_key(samples[i]) for i in order]
    progress.check_order(done, [(label, samples[i].id) for (label, _), i in zip(keys, order)])
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = fm.backbone.device
    bar = _resumed("evaluating", len(done), len(order))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        plan = _plan_for(len(idx), static, rand, router, device)  # drawn for skipped batches too: same random plans
        if start + len(idx) <= len(done):
            continue
        batch = collate_left_padded([prompts[i] for i in idx], pad_id)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        segments = {k: v.to(device) for k, v in batch["segments"].items()}
        res = fm.generate(ids, mask, plan=plan, max_new_tokens=max(budgets[i] for i in idx), segments=segments)
        finished = []
        for row, i in enumerate(idx):
            if start + row < len(done):
                continue
            text = tok.decode(res.sequences[row, :budgets[i]], skip_special_tokens=True)
            finished.append(make_record(task, samples[i], text, res.decisions[row].tolist(), int(mask[row].sum())))
        progress.append(finished)
        bar.update(len(finished))
    bar.close()
    return [record_from_line(line, length) for line, (_, length) in zip(progress.read(), keys)]


@torch.no_grad()
def evaluate_ppl(fm: FluxModel, task: PerplexityTask, static, rand, router, progress: EvalProgress,
                 done: list[dict[str, Any]], uses_sa: bool = True) -> list:
    """Sliding-window perplexity, one window at a time, appended and resumed like generation."""
    device = fm.backbone.device
    windows = task.windows(fm.backbone.tokenizer)
    if uses_sa:
        warn_if_window_covers(fm.pattern, max(len(w.input_ids) for w in windows), "evaluation")
    label, length = task.row_key()
    progress.check_order(done, [(label, w.id) for w in windows])
    bar = _resumed("perplexity", len(done), len(windows))
    for j, window in enumerate(windows):
        plan = _plan_for(1, static, rand, router, device)
        if j < len(done):
            continue
        ids = torch.tensor([list(window.input_ids)], device=device)
        out = fm(ids, plan=plan)
        logits = out.logits[0, :-1].float()
        targets = ids[0, 1:]
        nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        scored = nll[-window.n_scored:] if window.n_scored < nll.numel() else nll
        progress.append([task.record(window, float(scored.sum()), out.decisions[0].tolist())])
        bar.update(1)
    bar.close()
    return [record_from_line(line, length) for line in progress.read()]


def print_table(results: dict[str, Any]) -> None:
    print(f"\n{results['backbone']}  routing={results['routing']}  sparse={json.dumps(results['sparse'])}")
    print(f"{'task':<32}{'length':>8}{'n':>6}{'score':>8}{'sparsity':>10}")
    for row in results["results"]:
        print(f"{row['task']:<32}{row['length']:>8}{row['n']:>6}{row['score']:>8.3f}{row['sparsity']:>10.3f}")
    s = results["summary"]
    print(f"{'summary':<46}{s['score']:>8.3f}{s['sparsity']:>10.3f}")


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="evaluate")
@report_user_errors
def hydra_main(cfg: DictConfig) -> None:
    evaluate(cfg)


def main() -> None:
    run_cli(hydra_main)


if __name__ == "__main__":
    main()
