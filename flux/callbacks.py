"""Training callbacks: routing heatmaps for the logger, the progress bar, and the router export at the end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from flux import viz
from flux.atomic import atomic_open
from flux.errors import ConfigError
from flux.evals.results import ROUTING_FILE, check_routing_record
from flux.lit import FluxLitModule
from flux.router import export_router


class RoutingMapCallback(L.Callback):
    """Layer x sample routing maps drawn with flux.viz.routing_heatmap (the figure the notebooks show): the last
    training batch every `every_n_steps` steps, and every sample of each validation pass. Each map is a PNG under
    `out_dir` and, when W&B logs, an image there; a validation pass also leaves its records as
    `val_stepNNNNNN.routing.jsonl` (the routing.jsonl schema, score null), so notebooks can redraw it."""

    def __init__(self, out_dir: str, every_n_steps: int = 50) -> None:
        if every_n_steps < 1:
            raise ConfigError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.out_dir = Path(out_dir)
        self.every_n_steps = every_n_steps

    def _draw(self, trainer: L.Trainer, module: FluxLitModule, records: list[dict[str, Any]], tag: str) -> None:
        if not records or not trainer.is_global_zero:
            return
        matplotlib.use("Agg", force=False)
        title = f"{tag} routing, step {trainer.global_step} ({len(records)} samples)"
        fig = viz.routing_heatmap(records, num_layers=module.flux_model.num_layers, title=title)
        path = viz.save_figure(fig, self.out_dir / f"{tag}_step{trainer.global_step:06d}.png")
        for logger in trainer.loggers:
            if logger.__class__.__name__ == "WandbLogger":
                logger.log_image(key=f"{tag}/routing_map", images=[str(path)], step=trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: FluxLitModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._draw(trainer, pl_module, pl_module.last_routing, "train")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: FluxLitModule) -> None:
        if trainer.sanity_checking or not pl_module.val_routing or not trainer.is_global_zero:
            return
        self._draw(trainer, pl_module, pl_module.val_routing, "val")
        for i, record in enumerate(pl_module.val_routing):
            check_routing_record(record, f"validation record {i}")
        with atomic_open(self.out_dir / f"val_step{trainer.global_step:06d}.{ROUTING_FILE}", "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in pl_module.val_routing)


class FluxProgressBar(TQDMProgressBar):
    """Lightning's progress bar showing what tells a healthy router run from a stuck one: the loss, the share of
    layers on sparse attention (Ω, hard decisions of the batch) against its current target, and the two Lagrange
    multipliers that push Ω there (after validation, also the validation Ω)."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, str]:
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.as_tensor(v).numel() == 1}
        shown = {}
        if "train/loss" in m:
            shown["loss"] = f"{m['train/loss']:.3f}"
        if "train/sparsity_hard" in m and "train/target" in m:
            shown["Ω"] = f"{m['train/sparsity_hard']:.2f}"
            shown["target"] = f"{m['train/target']:.2f}"
        if "train/lambda1" in m and "train/lambda2" in m:
            shown["λ1"] = f"{m['train/lambda1']:.3g}"
            shown["λ2"] = f"{m['train/lambda2']:.3g}"
        if "val/sparsity_hard" in m:
            shown["val Ω"] = f"{m['val/sparsity_hard']:.2f}"
        return shown


class ExportRouterCallback(L.Callback):
    """Write router.safetensors + router.json + the README.md model card when training ends (rank zero only)."""

    def __init__(self, out_dir: str, pattern: dict[str, Any]) -> None:
        self.out_dir = out_dir
        self.pattern = pattern
        self.exported = False  # read by flux.train, which reports an export only when one happened

    def on_train_end(self, trainer: L.Trainer, pl_module: FluxLitModule) -> None:
        if not trainer.is_global_zero:
            return
        export_router(pl_module.router, self.out_dir, pl_module.flux_model.backbone, self.pattern,
                      pl_module.training_summary())
        self.exported = True
