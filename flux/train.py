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
from omegaconf import DictConfig, OmegaConf

from flux.callbacks import ExportRouterCallback, RoutingMapCallback
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


def build_trainer(cfg: DictConfig, out_dir: Path, pattern_info: dict[str, Any]) -> L.Trainer:
    logger = build(cfg.logger) if cfg.get("logger") else False
    callbacks = [
        L.pytorch.callbacks.ModelCheckpoint(dirpath=str(out_dir / "checkpoints"), save_last=True,
                                            every_n_train_steps=int(cfg.checkpoint_every), save_top_k=-1,
                                            filename="step{step:06d}", auto_insert_metric_name=False),
        RoutingMapCallback(str(out_dir / "routing_maps"), every_n_steps=int(cfg.routing_map_every)),
        ExportRouterCallback(str(out_dir / "router"), pattern_info),
        L.pytorch.callbacks.TQDMProgressBar(refresh_rate=1),
    ]
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    return build(trainer_cfg, logger=logger, callbacks=callbacks, plugins=[AtomicCheckpointIO()],
                       default_root_dir=str(out_dir))


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
            "global_step": trainer.global_step}


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> None:
    result = run(cfg)
    print(f"router exported to {result['router_dir']} after {result['global_step']} steps")


if __name__ == "__main__":
    main()
