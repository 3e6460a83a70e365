"""Training callbacks: routing heatmaps for the logger, and the router export at the end of training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import matplotlib

from flux import viz
from flux.lit import FluxLitModule
from flux.router import export_router


class RoutingMapCallback(L.Callback):
    """Every `every_n_steps` training steps (and after validation), draw the last batch's layer x sample routing map
    with flux.viz.routing_heatmap (the figure the notebooks show): logged as an image to W&B when that logger is on,
    and written as PNG under `out_dir` in every case."""

    def __init__(self, out_dir: str, every_n_steps: int = 50) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.out_dir = Path(out_dir)
        self.every_n_steps = every_n_steps

    def _draw(self, trainer: L.Trainer, module: FluxLitModule, tag: str) -> None:
        if not module.last_routing or not trainer.is_global_zero:
            return
        matplotlib.use("Agg", force=False)
        fig = viz.routing_heatmap(module.last_routing, num_layers=module.flux_model.num_layers,
                                  title=f"{tag} routing, step {trainer.global_step}")
        path = viz.save_figure(fig, self.out_dir / f"{tag}_step{trainer.global_step:06d}.png")
        for logger in trainer.loggers:
            if logger.__class__.__name__ == "WandbLogger":
                logger.log_image(key=f"{tag}/routing_map", images=[str(path)], step=trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: FluxLitModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._draw(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: FluxLitModule) -> None:
        if not trainer.sanity_checking:
            self._draw(trainer, pl_module, "val")


class ExportRouterCallback(L.Callback):
    """Write router.safetensors + router.json + the README.md model card when training ends (rank zero only)."""

    def __init__(self, out_dir: str, pattern: dict[str, Any]) -> None:
        self.out_dir = out_dir
        self.pattern = pattern

    def on_train_end(self, trainer: L.Trainer, pl_module: FluxLitModule) -> None:
        if not trainer.is_global_zero:
            return
        export_router(pl_module.router, self.out_dir, pl_module.flux_model.backbone, self.pattern,
                      pl_module.training_summary())
