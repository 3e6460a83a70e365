"""Experiment tracking for training runs: one logger run per training job, with its config and final metrics.

In a Hydra multirun the jobs of the basic launcher share one Python process. W&B keeps its run open between them
unless it is finished, so without `close_loggers` every job after the first logged into the first job's run, with
restarting steps and no hyperparameters. Here each job opens its own run, grouped by the sweep (the multirun
folder's name) and named by the job's overrides, logs the resolved config, writes the final metrics to the run's
summary, and finishes the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from flux.configs import build

WANDB_TARGET = "lightning.pytorch.loggers.WandbLogger"


def hydra_job_identity() -> dict[str, str]:
    """{group, name} of the current Hydra multirun job ({} outside a multirun, e.g. a plain run or compose())."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return {}
    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN:
        return {}
    name = hydra.job.override_dirname or f"job{hydra.job.num}"
    return {"group": Path(str(hydra.sweep.dir)).name, "name": name}


def build_logger(cfg: DictConfig) -> Any:
    """The configured Lightning logger (False for none); a W&B logger gets the job's group and name unless the
    config sets them."""
    if not cfg.get("logger"):
        return False
    extra: dict[str, Any] = {}
    if cfg.logger.get("_target_") == WANDB_TARGET:
        extra = {k: v for k, v in hydra_job_identity().items() if not cfg.logger.get(k)}
    return build(cfg.logger, **extra)


def log_config(loggers: list[Any], cfg: DictConfig) -> None:
    """The resolved config as the run's hyperparameters (W&B config, CSV hparams.yaml)."""
    params = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(params)


def close_loggers(loggers: list[Any], metrics: dict[str, float], failed: bool, rank_zero: bool) -> None:
    """Final metrics into each W&B run's summary, then finish it, so the next job of a sweep opens its own run."""
    if not rank_zero:
        return
    for logger in loggers:
        if logger.__class__.__name__ != "WandbLogger":
            continue
        run = logger.experiment  # started by log_config at the latest
        if metrics:
            run.summary.update(metrics)
        run.finish(exit_code=1 if failed else 0)
