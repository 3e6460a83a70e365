"""`python -m flux.train`: compose the Hydra config, build backbone + router + data, train with Lightning, export.

With no arguments this is the CPU quickstart on the offline SmolLM2 backbone. Paper-scale runs are experiment
configs: `python -m flux.train +experiment=qwen_32k`. Sweeps: `python -m flux.train -m sparse.window=1024,2048
router.tau_start=1.0,1.5 objective.target=0.3,0.5,0.7`.

With an `eval` group (`eval=ruler`; the experiment configs that ship routers set one) a run ends by evaluating the
router it exported, in this process, through `flux.evaluate.evaluate`: results.json and routing.jsonl go to
`<output_dir>/eval`, the summary into the router's card and the run's W&B summary, and results.json's provenance
names this job's overrides, so `experiments/tables.py <sweep folder>` labels each row by the values it swept.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from flux.callbacks import ExportRouterCallback, FluxProgressBar, RoutingMapCallback
from flux.conf import CONFIG_PATH
from flux.configs import build, build_backbone, build_pattern
from flux.errors import ConfigError, FluxUserError, report_user_errors, run_cli, warn
from flux.evals.base import TASK_TYPES
from flux.evals.provenance import task_settings
from flux.evals.results import RESULTS_FILE, read_results
from flux.evaluate import build_task, check_eval_group, evaluate
from flux.lit import AtomicCheckpointIO, FluxLitModule
from flux.memory import check_training_memory
from flux.model import FluxModel
from flux.objectives import ObjectiveError, TargetSchedule
from flux.preflight import check_sa_backend, check_writable_dir, warn_if_window_covers
from flux.resume import (
    AUTO,
    ResumePoint,
    check_backbone,
    check_pattern,
    check_router,
    check_tasks,
    read_checkpoint,
    resume_path,
)
from flux.router import META_FILE, LayerRouter, RouterConfig, export_router, load_router, read_router_meta
from flux.throughput import ThroughputCallback
from flux.tracking import build_logger, close_loggers, log_config

# Two Lightning warnings that describe flux's design, not a problem: the frozen backbone stays in eval mode (no
# dropout) while the router trains, and checkpoints are taken after each manual optimisation step on purpose.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
warnings.filterwarnings("ignore", message=r".*ModelCheckpoint with manual optimization.*")

ROUTER_KEYS = ("kind", "pool_size", "hidden", "init_fa_bias", "pooling", "read_layer", "threshold")


def training_backbone(cfg: DictConfig):
    """The backbone; `device: auto` (the random presets: weights made where they train) follows the trainer."""
    device = cfg.backbone.get("device")
    if device == "auto" and trainer_device_type(cfg.trainer) != "cuda":
        device = "cpu"
    return build_backbone(cfg, device=device)


def router_config(cfg: DictConfig) -> RouterConfig:
    """The router's settings alone (checked before any weights load)."""
    r = cfg.router
    return RouterConfig(tau=float(r.tau_start), **{k: (list(r[k]) if k == "hidden" else r[k])
                                                   for k in ROUTER_KEYS if k in r})


def build_router(cfg: DictConfig, num_layers: int, head_dim: int) -> LayerRouter:
    return LayerRouter(num_layers, head_dim, router_config(cfg))


def build_loggers(cfg: DictConfig, out_dir: Path) -> list[Logger] | bool:
    """The configured logger (one run per sweep job: flux.tracking), plus Lightning's CSVLogger under
    <output_dir>/csv when the configured one is another (W&B): every run then leaves a metrics.csv that the
    notebooks read. `logger=none` logs nothing."""
    logger = build_logger(cfg)
    if not logger:
        return False
    return [logger] if isinstance(logger, CSVLogger) else [logger, CSVLogger(save_dir=str(out_dir), name="csv")]


def build_trainer(cfg: DictConfig, out_dir: Path, pattern_info: dict[str, Any]) -> L.Trainer:
    callbacks: list[L.Callback] = []
    if cfg.checkpoint_every is not None:  # null: no checkpoints (and nothing to resume from)
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(
            dirpath=str(out_dir / "checkpoints"), save_last=True, every_n_train_steps=int(cfg.checkpoint_every),
            save_top_k=-1, filename="step{step:06d}", auto_insert_metric_name=False))
    callbacks += [
        RoutingMapCallback(str(out_dir / "routing_maps"), every_n_steps=int(cfg.routing_map_every)),
        ExportRouterCallback(str(out_dir / "router"), pattern_info),
        ThroughputCallback(),
        FluxProgressBar(refresh_rate=1),
    ]
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    return build(trainer_cfg, logger=build_loggers(cfg, out_dir), callbacks=callbacks,
                 plugins=[AtomicCheckpointIO()], default_root_dir=str(out_dir))


def log_locations(trainer: L.Trainer) -> list[str]:
    """Where this run's logs are, one line each, for the end-of-run summary."""
    lines = []
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            lines.append(f"metrics.csv  {Path(logger.log_dir) / 'metrics.csv'}")
        elif isinstance(logger, WandbLogger):
            run = logger.experiment
            run_dir = Path(run.dir).parent  # the run folder; .dir is its files/ subfolder
            lines.append(f"W&B run      {run_dir}" + (f"  (offline; upload with: wandb sync {run_dir})"
                                                      if run.offline else f"  {run.url}"))
        else:
            lines.append(f"{type(logger).__name__}  {logger.log_dir}")
    return lines


def summary_text(result: dict[str, Any]) -> str:
    """The few lines a run ends with: steps, final loss, Ω per task against its target, and where everything is."""
    s = result["summary"]
    loss = f"{s['final_loss']:.4f}" if s.get("final_loss") is not None else "n/a"
    lines = [f"flux.train: {s['steps']} steps, final loss {loss}",
             f"sparsity Ω per task ({s['sparsity_source']}) vs target:"]
    for task in s["tasks"]:
        omega = f"{s['sparsity'][task]:.2f}" if task in s["sparsity"] else " n/a"
        lines.append(f"  {task:<24} {s['task_types'][task]:<10} Ω {omega}  target {s['targets'][task]:.2f}")
    reached = [s["sparsity"][t] for t in s["tasks"] if t in s["sparsity"]]
    if reached:
        mean = sum(reached) / len(reached)
        goal = sum(s["targets"][t] for t in s["tasks"] if t in s["sparsity"]) / len(reached)
        lines.append(f"  {'mean':<35} Ω {mean:.2f}  target {goal:.2f}")
        if abs(mean - goal) > 0.1:
            lines.append("  Ω is still far from its target: train longer (trainer.max_steps), or let the "
                         "multipliers move faster (objective.lambda_lr)")
    lines.append(f"router       {result['router_dir']}  (router.safetensors, router.json, README.md)")
    if result.get("evaluation") is not None:
        ev = result["evaluation"]
        samples = sum(row["n"] for row in ev["results"])
        lines.append(f"evaluation   {result['eval_dir']}  score {ev['summary']['score']:.3f}, Ω "
                     f"{ev['summary']['sparsity']:.2f} over {samples} samples (results.json, routing.jsonl)")
    lines += result["logs"]
    lines.append(f"checkpoints  {Path(result['output_dir']) / 'checkpoints'}   routing maps  "
                 f"{Path(result['output_dir']) / 'routing_maps'}")
    return "\n".join(lines)


def _positive_steps(value: Any, key: str, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}={value!r} must be a positive number of training steps; {fix}")


def trainer_device_type(trainer_cfg: DictConfig) -> str:
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if accelerator in ("gpu", "cuda") else accelerator


def check_train_config(cfg: DictConfig) -> None:
    """Settings that are wrong whatever the model and data: checked before anything loads."""
    max_steps = cfg.trainer.get("max_steps", -1)
    if max_steps != -1:
        _positive_steps(max_steps, "trainer.max_steps",
                        "a run of 0 steps trains nothing (use -1 to train for trainer.max_epochs)")
    if cfg.checkpoint_every is not None:
        _positive_steps(cfg.checkpoint_every, "checkpoint_every", "or null to write no checkpoints")
    _positive_steps(cfg.routing_map_every, "routing_map_every", "e.g. routing_map_every=50")
    device_type = trainer_device_type(cfg.trainer)
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={cfg.trainer.get('accelerator')} but no CUDA device is visible; use "
                          "trainer.accelerator=cpu (or trainer=cpu)")
    check_sa_backend(cfg.attention.sa_backend, device_type)


def per_type_targets(cfg: DictConfig) -> dict[str, float]:
    """objective.per_type: one target per task type (retrieval | holistic), checked before anything loads."""
    per_type = {str(k): v for k, v in (cfg.objective.get("per_type") or {}).items()}
    unknown = sorted(set(per_type) - set(TASK_TYPES))
    if unknown:
        raise ObjectiveError(f"objective.per_type names task type(s) {unknown}; use {' and '.join(TASK_TYPES)}, e.g. "
                             "objective.per_type.retrieval=0.45")
    for kind, value in per_type.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ObjectiveError(f"objective.per_type.{kind}={value!r} must be a fraction of SA layers in [0, 1]")
    return {k: float(v) for k, v in per_type.items()}


def with_type_targets(target: TargetSchedule, per_type: dict[str, float], task_types: dict[str, str]
                      ) -> TargetSchedule:
    """The schedule with each task of a type in `per_type` given that type's target; objective.per_task wins."""
    by_type = {task: per_type[kind] for task, kind in task_types.items() if kind in per_type}
    return TargetSchedule(end=target.end, start=target.start, ramp_steps=target.ramp_steps,
                          per_task={**by_type, **target.per_task})


def build_target(cfg: DictConfig) -> TargetSchedule:
    obj = cfg.objective
    per_type_targets(cfg)
    target = TargetSchedule(end=float(obj.target), start=float(obj.target_start), ramp_steps=int(obj.ramp_steps),
                            per_task={k: float(v) for k, v in (obj.per_task or {}).items()})
    max_steps = cfg.trainer.get("max_steps", -1)
    reached = target.target("", max_steps - 1) if max_steps > 0 else target.end
    if max_steps < target.ramp_steps and abs(reached - target.end) > 1e-9:
        warn(f"trainer.max_steps={max_steps} < objective.ramp_steps={target.ramp_steps}: the sparsity target stops "
             f"at {reached:.3g} instead of reaching {target.end:.3g}; raise trainer.max_steps or lower "
             "objective.ramp_steps")
    return target


def check_target_tasks(target: TargetSchedule, tasks: list[str]) -> None:
    unknown = sorted(set(target.per_task) - set(tasks))
    if unknown:
        raise ObjectiveError(f"objective.per_task names task(s) {unknown} that the data does not have; valid task "
                             f"names: {', '.join(tasks)}")


def check_prompt_lengths(data: Any, pattern: Any, max_positions: int) -> int:
    """Tokenise the data now (Lightning would do it inside fit) and compare its longest prompt with the backbone's
    positions and the sparse window; returns that longest prompt."""
    data.setup("fit")
    lengths = [len(ds[i]) for ds in (data.train_dataset, data.val_dataset) for i in range(len(ds))]
    longest = max(lengths, default=0)
    if longest > max_positions:
        raise ConfigError(f"the longest training prompt has {longest} tokens but the backbone has {max_positions} "
                          f"positions; set data.max_tokens={max_positions} or lower (long contexts lose their middle)")
    warn_if_window_covers(pattern, longest, "training")
    return longest


def longest_answer_window(data: Any) -> int:
    """Positions from a training prompt's first answer-predicting token to its end, at most: the answer rows (and
    teacher window) one sample brings to the loss."""
    windows = [len(p) - p.answer_span[0] + 1 for p in (data.train_dataset[i] for i in range(len(data.train_dataset)))
               if p.answer_span is not None]
    return max(windows, default=1)


def check_fits_on_gpu(cfg: DictConfig, backbone: Any, longest: int, data: Any) -> None:
    """On a CUDA trainer, refuse before the first step a length and batch whose step cannot fit (flux.memory), with
    the estimate and the switch that helps. FSDP shards the weights over the devices of a node."""
    if trainer_device_type(cfg.trainer) != "cuda":
        return
    strategy = cfg.trainer.get("strategy")
    target = str(strategy.get("_target_", "")) if isinstance(strategy, DictConfig) else str(strategy or "")
    devices = cfg.trainer.get("devices", 1)
    shards = int(devices) if "fsdp" in target.lower() and isinstance(devices, int) else 1
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    check_training_memory(backbone.model, device, longest, int(cfg.data.batch_size),
                          bool(cfg.gradient_checkpointing), longest_answer_window(data),
                          float(cfg.objective.distill_weight) > 0, shards)


def evaluation_metrics(results: dict[str, Any] | None) -> dict[str, float]:
    """The in-run evaluation as flat metrics for the run's summary: overall and per task (over its lengths)."""
    if results is None:
        return {}
    metrics = {"eval/score": results["summary"]["score"], "eval/sparsity": results["summary"]["sparsity"]}
    for task in sorted({row["task"] for row in results["results"]}):
        rows = [row for row in results["results"] if row["task"] == task]
        n = sum(row["n"] for row in rows)
        for key in ("score", "sparsity"):
            metrics[f"eval/{task}/{key}"] = sum(row[key] * row["n"] for row in rows) / n
    return metrics


def evaluation_config(cfg: DictConfig, routing: dict[str, Any], output_dir: str | Path) -> DictConfig:
    """The flux.evaluate config of a training config's `eval` group: same backbone, sparse pattern, attention
    backends and device as training, with `routing` (e.g. {"mode": "router", "checkpoint": ...}). Baselines built
    from it run on exactly the split and pattern the run's router was evaluated on."""
    if not cfg.get("eval"):
        raise ConfigError("this training config has no eval group; add one, e.g. eval=ruler_fresh")
    device = "cuda" if trainer_device_type(cfg.trainer) == "cuda" else None
    return OmegaConf.create({
        "backbone": OmegaConf.to_container(cfg.backbone, resolve=True),
        "sparse": OmegaConf.to_container(cfg.sparse, resolve=True),
        "eval": OmegaConf.to_container(cfg.eval, resolve=True),
        "attention": OmegaConf.to_container(cfg.attention, resolve=True),
        "routing": dict(routing), "output_dir": str(output_dir), "output": None, "device": device})


def evaluate_exported_router(cfg: DictConfig, router: LayerRouter, out_dir: Path,
                             overrides: list[str] | None) -> dict[str, Any]:
    """Evaluate the router this run exported (cfg.eval, in this process) into <output_dir>/eval and attach the
    results to the router's card. The router runs its own pattern (the one it trained with); a rerun continues an
    interrupted evaluation (flux.evaluate resumes from routing.jsonl)."""
    eval_cfg = evaluation_config(cfg, {"mode": "router", "checkpoint": str(out_dir / "router")}, out_dir / "eval")
    seeds = {"train": int(cfg.seed)}
    if cfg.data.get("train_seed") is not None:
        seeds["train_data"] = int(cfg.data.train_seed)
    results = evaluate(eval_cfg, sparse_overrides=[], overrides=overrides, seeds=seeds)
    router.card.evaluation = results
    router.save_pretrained(out_dir / "router")  # same weights (same sha256), router.json and card gain the results
    return results


def exported_training_summary(router_dir: Path, state: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """The training summary in router_dir's router.json when that folder holds exactly these weights (the run that
    wrote it ended there), so exporting them again keeps what the run recorded; None otherwise."""
    try:
        exported, meta = load_router(router_dir)
    except FluxUserError:
        return None
    saved = exported.state_dict()
    same = saved.keys() == state.keys() and all(torch.equal(saved[k], state[k].float().cpu()) for k in saved)
    return meta.get("training") if same and meta.get("training") else None


def finished_run(cfg: DictConfig, out_dir: Path, config: RouterConfig, pattern: Any) -> dict[str, Any] | None:
    """With resume=auto, a run folder whose run already ended: its router.json records trainer.max_steps steps and,
    with an eval group, eval/results.json holds the evaluation of the same split. Such a job has nothing left to do
    (a rerun sweep skips it in seconds); its router must have this run's router config and sparse pattern, else the
    folder belongs to another run (ResumeError). None when something is left to do."""
    max_steps = cfg.trainer.get("max_steps", -1)
    meta_path = out_dir / "router" / META_FILE
    if str(cfg.resume) != AUTO or max_steps <= 0 or not meta_path.is_file():
        return None
    meta = read_router_meta(meta_path)
    training = meta.get("training") or {}
    steps = training.get("steps")
    if not isinstance(steps, int) or steps < max_steps:
        return None
    done = ResumePoint(meta_path, steps, meta.get("backbone"), list(training.get("tasks") or []), meta["router"],
                       meta.get("sparse"), {})
    check_router(done, asdict(config))
    check_pattern(done, pattern.describe())
    evaluation = None
    if cfg.get("eval"):
        results_file = out_dir / "eval" / RESULTS_FILE
        if not results_file.is_file():
            return None
        evaluation = read_results(results_file)
        split = task_settings(OmegaConf.to_container(cfg.eval.task, resolve=True))
        if (evaluation.get("provenance") or {}).get("task") != split:
            return None  # evaluated on another split: evaluate again (flux.evaluate refuses to mix the two)
    return {"output_dir": str(out_dir), "router_dir": str(out_dir / "router"), "metrics": {}, "global_step": steps,
            "steps_this_run": 0, "exported": False, "resumed_from": steps, "evaluation": evaluation,
            "eval_dir": str(out_dir / "eval"),
            "note": f"{out_dir} already holds this run's router ({steps} steps)"
                    + (" and its evaluation" if evaluation is not None else "") + "; nothing left to do (resume=auto)"}


def run(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, Any]:
    """Everything after composition; returns paths, the final metrics and what happened (used by tests and sweeps).

    Settings, the sparse pattern, the router config, the targets, the output folder and the resume checkpoint are
    checked before the backbone loads; the task list, the prompts and the evaluation task before training starts.
    `overrides`: what defines this run, for the evaluation's provenance (default: this Hydra job's overrides)."""
    out_dir = Path(cfg.output_dir)
    check_train_config(cfg)
    pattern = build_pattern(cfg)
    config = router_config(cfg)
    target = build_target(cfg)
    if cfg.get("eval"):
        check_eval_group(cfg)
    finished = finished_run(cfg, out_dir, config, pattern)
    if finished is not None:
        return finished
    checkpoint = resume_path(cfg.resume, out_dir)
    point = read_checkpoint(checkpoint) if checkpoint is not None else None
    if point is not None:
        check_router(point, asdict(config))
        check_pattern(point, pattern.describe())
    check_writable_dir(out_dir, "output_dir")
    L.seed_everything(int(cfg.seed), workers=True)
    backbone = training_backbone(cfg)
    if point is not None:
        check_backbone(point.backbone, backbone.name)
    if cfg.get("eval"):
        build_task(cfg, backbone.max_positions, backbone.name)  # an impossible evaluation fails before training
    router = build_router(cfg, backbone.num_layers, backbone.head_dim)
    max_steps = cfg.trainer.get("max_steps", -1)
    if point is not None and 0 < max_steps <= point.step:
        router.load_state_dict(point.router_state)
        summary = (exported_training_summary(out_dir / "router", point.router_state)
                   or {"steps": point.step, "tasks": point.tasks, "final_metrics": {}})
        export_router(router, out_dir / "router", backbone, pattern.describe(), summary)
        evaluation = evaluate_exported_router(cfg, router, out_dir, overrides) if cfg.get("eval") else None
        return {"output_dir": str(out_dir), "router_dir": str(out_dir / "router"), "metrics": {},
                "global_step": point.step, "steps_this_run": 0, "exported": True, "resumed_from": point.step,
                "evaluation": evaluation, "eval_dir": str(out_dir / "eval"),
                "note": f"{point.path} is already at step {point.step} >= trainer.max_steps={max_steps}: nothing "
                        "left to train (raise trainer.max_steps to continue); exported its router"}
    data = build(cfg.data, tokenizer=backbone.tokenizer)
    target = with_type_targets(target, per_type_targets(cfg), data.task_types)
    check_target_tasks(target, data.task_names)
    if point is not None:
        check_tasks(point.tasks, data.task_names, where=f"resume={point.path}")
    longest = check_prompt_lengths(data, pattern, backbone.max_positions)
    check_fits_on_gpu(cfg, backbone, longest, data)
    obj = cfg.objective
    flux_model = FluxModel(backbone, pattern=pattern, fa_backend=cfg.attention.fa_backend,
                           sa_backend=cfg.attention.sa_backend)
    module = FluxLitModule(flux_model, router, tasks=data.task_names, target=target,
                           router_lr=float(cfg.router.lr), lambda_lr=float(obj.lambda_lr),
                           weight_decay=float(cfg.router.weight_decay), lm_weight=float(obj.lm_weight),
                           distill_weight=float(obj.distill_weight),
                           distill_temperature=float(obj.distill_temperature),
                           tau_start=float(cfg.router.tau_start), tau_end=float(cfg.router.tau_end),
                           tau_fraction=float(cfg.router.tau_fraction),
                           gradient_checkpointing=bool(cfg.gradient_checkpointing), task_types=data.task_types)
    trainer = build_trainer(cfg, out_dir, pattern.describe())
    export = next(c for c in trainer.callbacks if isinstance(c, ExportRouterCallback))
    log_config(trainer.loggers, cfg)
    failed, evaluation = True, None
    try:
        trainer.fit(module, datamodule=data, ckpt_path=str(point.path) if point is not None else None)
        if cfg.get("eval") and export.exported and not trainer.interrupted:
            evaluation = evaluate_exported_router(cfg, router, out_dir, overrides)
        failed = trainer.interrupted
    finally:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.as_tensor(v).numel() == 1}
        close_loggers(trainer.loggers, {**metrics, **evaluation_metrics(evaluation)}, failed, trainer.is_global_zero)
    start = point.step if point is not None else 0
    result = {"output_dir": str(out_dir), "router_dir": str(out_dir / "router"), "metrics": metrics,
              "global_step": trainer.global_step, "steps_this_run": trainer.global_step - start,
              "exported": export.exported, "resumed_from": point.step if point is not None else None,
              "summary": module.training_summary(), "logs": log_locations(trainer),
              "is_global_zero": trainer.is_global_zero, "evaluation": evaluation, "eval_dir": str(out_dir / "eval")}
    if trainer.interrupted:
        last = out_dir / "checkpoints" / "last.ckpt"
        result["note"] = (f"training was interrupted at step {trainer.global_step}; no router exported"
                          + (f" (continue with resume={last})" if last.is_file() else ""))
    return result


def summary_line(result: dict[str, Any]) -> str:
    """What the run did, truthfully: the note of a run that did not train, or the export and its steps."""
    evaluated = (f"; evaluated it into {result['eval_dir']}" if result.get("evaluation") is not None else "")
    if "note" in result:
        return result["note"] + (f" to {result['router_dir']}{evaluated}" if result["exported"] else "")
    resumed = result["resumed_from"]
    steps = f"{result['global_step']} steps ({result['steps_this_run']} in this run"
    steps += f", resumed from step {resumed})" if resumed else ")"
    if not result["exported"]:  # a DDP rank other than 0: rank 0 writes the router
        return f"training ended after {steps}; this process exported no router (rank 0 does)"
    return f"router exported to {result['router_dir']} after {steps}" + evaluated


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
@report_user_errors
def hydra_main(cfg: DictConfig) -> None:
    result = run(cfg)
    if result.get("is_global_zero", True) and result["exported"] and "note" not in result:
        print(summary_text(result))  # under DDP every rank runs main; one summary is enough
    print(summary_line(result))


def main() -> None:
    run_cli(hydra_main)


if __name__ == "__main__":
    main()
