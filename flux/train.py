"""`python -m flux.train`: compose the Hydra config, build backbone + router + data, train with Lightning, export.

With no arguments this is the CPU quickstart on the offline SmolLM2 backbone. Paper-scale runs are experiment
configs: `python -m flux.train +experiment=qwen_32k`. Sweeps: `python -m flux.train -m sparse.window=1024,2048
router.tau_start=1.0,1.5 objective.target=0.3,0.5,0.7`.
"""

from __future__ import annotations

import warnings
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
from flux.lit import AtomicCheckpointIO, FluxLitModule
from flux.model import FluxModel
from flux.objectives import TargetSchedule
from flux.router import LayerRouter, RouterConfig

# Two Lightning warnings that describe flux's design, not a problem: the frozen backbone stays in eval mode (no
# dropout) while the router trains, and checkpoints are taken after each manual optimisation step on purpose.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
warnings.filterwarnings("ignore", message=r".*ModelCheckpoint with manual optimization.*")

ROUTER_KEYS = ("kind", "pool_size", "hidden", "init_fa_bias", "pooling", "read_layer", "threshold")


def build_router(cfg: DictConfig, num_layers: int, head_dim: int) -> LayerRouter:
    r = cfg.router
    config = RouterConfig(tau=float(r.tau_start), **{k: (list(r[k]) if k == "hidden" else r[k])
                                                     for k in ROUTER_KEYS if k in r})
    return LayerRouter(num_layers, head_dim, config)


def build_loggers(cfg: DictConfig, out_dir: Path) -> list[Logger] | bool:
    """The configured logger, plus Lightning's CSVLogger under <output_dir>/csv when the configured one is another
    (W&B): every run then leaves a metrics.csv that the notebooks read. `logger=none` logs nothing."""
    if not cfg.get("logger"):
        return False
    logger = build(cfg.logger)
    return [logger] if isinstance(logger, CSVLogger) else [logger, CSVLogger(save_dir=str(out_dir), name="csv")]


def build_trainer(cfg: DictConfig, out_dir: Path, pattern_info: dict[str, Any]) -> L.Trainer:
    callbacks = [
        L.pytorch.callbacks.ModelCheckpoint(dirpath=str(out_dir / "checkpoints"), save_last=True,
                                            every_n_train_steps=int(cfg.checkpoint_every), save_top_k=-1,
                                            filename="step{step:06d}", auto_insert_metric_name=False),
        RoutingMapCallback(str(out_dir / "routing_maps"), every_n_steps=int(cfg.routing_map_every)),
        ExportRouterCallback(str(out_dir / "router"), pattern_info),
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
    lines += result["logs"]
    lines.append(f"checkpoints  {Path(result['output_dir']) / 'checkpoints'}   routing maps  "
                 f"{Path(result['output_dir']) / 'routing_maps'}")
    return "\n".join(lines)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Everything after composition; returns paths and the final metrics (used by tests and sweeps)."""
    out_dir = Path(cfg.output_dir)
    L.seed_everything(int(cfg.seed), workers=True)
    pattern = build_pattern(cfg)
    backbone = build_backbone(cfg)
    router = build_router(cfg, backbone.num_layers, backbone.head_dim)
    data = build(cfg.data, tokenizer=backbone.tokenizer)
    obj = cfg.objective
    target = TargetSchedule(end=float(obj.target), start=float(obj.target_start), ramp_steps=int(obj.ramp_steps),
                            per_task={k: float(v) for k, v in (obj.per_task or {}).items()})
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
    trainer.fit(module, datamodule=data, ckpt_path=cfg.resume)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.as_tensor(v).numel() == 1}
    return {"output_dir": str(out_dir), "router_dir": str(out_dir / "router"), "metrics": metrics,
            "global_step": trainer.global_step, "summary": module.training_summary(),
            "logs": log_locations(trainer), "is_global_zero": trainer.is_global_zero}


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> None:
    result = run(cfg)
    if result["is_global_zero"]:  # under DDP every rank runs main; one summary is enough
        print(summary_text(result))


if __name__ == "__main__":
    main()
