"""`python -m flux.evaluate`: score a backbone under one routing mode and write results.json + routing.jsonl.

Routing modes (`routing.mode=`): dense (every layer FA), sparse (every layer SA), router (a trained router from
`routing.checkpoint=PATH`), static (`routing.sa_layers=[...]`), first_dense (`routing.k` first layers FA, the rest SA),
random (a seeded random layer plan with `routing.sparsity` of the layers on SA, per sample). Everything that can be
checked before the model runs is checked first: task, files, lengths against the model's positions, the router's
backbone and layer count.
"""

from __future__ import annotations

import json
import random as _random
import warnings
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from flux.backbone import Backbone, backbone_max_positions, load_backbone
from flux.conf import CONFIG_PATH
from flux.configs import build, build_pattern
from flux.data.prompting import build_prompt, collate_left_padded
from flux.evals import PerplexityTask, aggregate, build_results, make_record, write_results, write_routing
from flux.model import FluxModel
from flux.router import check_router_files, load_router

ROUTING_MODES = ("dense", "sparse", "router", "static", "first_dense", "random")


class EvalConfigError(ValueError):
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


def build_router_model(cfg: DictConfig, backbone: Backbone) -> tuple[FluxModel, Any]:
    routing = cfg.routing
    router = None
    if routing.mode == "router":
        router, meta = load_router(routing.checkpoint, backbone)
        router.to(backbone.device)
    pattern = build_pattern(cfg)
    if router is not None and meta.get("sparse") and meta["sparse"] != pattern.describe():
        warnings.warn(f"the router was trained with sparse attention {meta['sparse']} but this run uses "
                      f"{pattern.describe()}; pass the same sparse.* values to reproduce its numbers", stacklevel=2)
    fm = FluxModel(backbone, pattern=pattern, fa_backend=cfg.attention.fa_backend,
                   sa_backend=cfg.attention.sa_backend, router=router)
    return fm, router


def check_config(cfg: DictConfig) -> None:
    if cfg.routing.mode not in ROUTING_MODES:
        raise EvalConfigError(f"unknown routing mode {cfg.routing.mode!r}; choose one of {', '.join(ROUTING_MODES)}")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the evaluation described by a composed config; returns the results dict (also written to disk)."""
    check_config(cfg)
    task_cfg = OmegaConf.to_container(cfg.eval.task, resolve=True, throw_on_missing=True)
    task = build(task_cfg)
    out_dir = Path(cfg.output_dir)
    backbone_params = OmegaConf.to_container(cfg.backbone, resolve=True)
    backbone_params.pop("description", None)
    if cfg.get("device"):
        backbone_params["device"] = cfg.device
    needed = task.required_positions()
    limit = backbone_max_positions(**backbone_params)
    if needed is not None and needed > limit:
        raise EvalConfigError(f"the task needs {needed} positions but backbone {backbone_params['source']!r} has "
                              f"{limit}; lower the lengths (e.g. eval.task.lengths) to fit")
    if cfg.routing.mode == "router":
        check_router_files(cfg.routing.get("checkpoint"))
    backbone = load_backbone(**backbone_params)
    fm, router = build_router_model(cfg, backbone)
    mode = cfg.routing.mode
    routing = OmegaConf.to_container(cfg.routing, resolve=True)
    static = layer_plan(mode, backbone.num_layers, routing)
    rand = RandomPlan(backbone.num_layers, float(routing.get("sparsity") or 0.0),
                      int(routing.get("seed", 0))) if mode == "random" else None
    if isinstance(task, PerplexityTask):
        records = evaluate_ppl(fm, task, static, rand, router)
    else:
        records = evaluate_generation(fm, task, static, rand, router, int(cfg.eval.get("batch_size", 1)),
                                      cfg.eval.get("max_input_tokens"))
    label = mode if mode not in ("random", "static", "first_dense") else f"{mode}"
    results = build_results(backbone.name, label, fm.pattern.describe(), aggregate(records))
    paths = [out_dir / "results.json"] + ([Path(cfg.output)] if cfg.get("output") else [])
    write_results(results, *paths)
    write_routing(out_dir / "routing.jsonl", records)
    print_table(results)
    return results


def _plan_for(batch: int, static, rand, router, device):
    if static is not None:
        return static
    if rand is not None:
        return rand.draw(batch).to(device)
    return router.as_plan()


def evaluate_generation(fm: FluxModel, task, static, rand, router, batch_size: int,
                        max_input_tokens: int | None = None) -> list:
    """Greedy generation in length-sorted batches; prompts are middle-truncated to fit the model (and
    `max_input_tokens` when set, as LongBench's protocol does)."""
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
    order = sorted(range(len(samples)), key=lambda i: (len(prompts[i]), i))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    records = []
    device = fm.backbone.device
    bar = tqdm(total=len(order), desc="evaluating", unit="sample")
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate_left_padded([prompts[i] for i in idx], pad_id)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        segments = {k: v.to(device) for k, v in batch["segments"].items()}
        plan = _plan_for(len(idx), static, rand, router, device)
        res = fm.generate(ids, mask, plan=plan, max_new_tokens=max(budgets[i] for i in idx), segments=segments)
        for row, i in enumerate(idx):
            new = res.sequences[row, :budgets[i]]
            text = tok.decode(new, skip_special_tokens=True)
            records.append(make_record(task, samples[i], text, res.decisions[row].tolist(),
                                       int(mask[row].sum())))
        bar.update(len(idx))
    bar.close()
    return records


@torch.no_grad()
def evaluate_ppl(fm: FluxModel, task: PerplexityTask, static, rand, router) -> list:
    records = []
    device = fm.backbone.device
    for window in tqdm(task.windows(fm.backbone.tokenizer), desc="perplexity", unit="window"):
        ids = torch.tensor([list(window.input_ids)], device=device)
        out = fm(ids, plan=_plan_for(1, static, rand, router, device))
        logits = out.logits[0, :-1].float()
        targets = ids[0, 1:]
        nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        scored = nll[-window.n_scored:] if window.n_scored < nll.numel() else nll
        records.append(task.record(window, float(scored.sum()), out.decisions[0].tolist()))
    return records


def print_table(results: dict[str, Any]) -> None:
    print(f"\n{results['backbone']}  routing={results['routing']}  sparse={json.dumps(results['sparse'])}")
    print(f"{'task':<32}{'length':>8}{'n':>6}{'score':>8}{'sparsity':>10}")
    for row in results["results"]:
        print(f"{row['task']:<32}{row['length']:>8}{row['n']:>6}{row['score']:>8.3f}{row['sparsity']:>10.3f}")
    s = results["summary"]
    print(f"{'summary':<46}{s['score']:>8.3f}{s['sparsity']:>10.3f}")


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
