"""Lightning glue: FluxLitModule trains only the router (and the Lagrange multipliers) on a frozen backbone.

Checkpoints hold the router, lambdas, optimiser states and step, never the backbone (it is rebuilt from its source at
resume), and are written through `AtomicCheckpointIO` (temp file + rename), so a crash loses at most the steps since
the last checkpoint and never leaves a truncated file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from safetensors.torch import load_file, save_file
from torchmetrics import MeanMetric

from flux.backbone import enable_activation_checkpointing
from flux.errors import FluxUserError
from flux.model import FluxModel
from flux.objectives import (
    SparsityConstraint,
    TargetSchedule,
    answer_lm_loss,
    answer_losses,
    answer_rows,
    answer_window,
    sample_sparsity,
)
from flux.resume import check_backbone, remap_tasks
from flux.router import LayerRouter, RouterConfig, RouterPlan, cosine_tau, router_config_dict

BACKBONE_PREFIX = "flux_model."


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary file in the target folder, fsync, then os.replace: all or nothing."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class FluxLitModule(L.LightningModule):
    """Router training: LM (+ optional distillation) loss plus the per-task sparsity Lagrangian."""

    def __init__(self, flux_model: FluxModel, router: LayerRouter, tasks: list[str], target: TargetSchedule,
                 router_lr: float = 1e-3, lambda_lr: float = 1e-2, weight_decay: float = 0.0,
                 lm_weight: float = 1.0, distill_weight: float = 0.0, distill_temperature: float = 1.0,
                 tau_start: float = 1.5, tau_end: float = 1.0, tau_fraction: float = 0.6,
                 gradient_checkpointing: bool = False, task_types: dict[str, str] | None = None) -> None:
        super().__init__()
        self.flux_model = flux_model
        self.router = router
        self.constraint = SparsityConstraint(tasks)
        self.tasks = list(tasks)
        self.task_types = dict(task_types or {})
        self.target = target
        self.router_lr, self.lambda_lr, self.weight_decay = router_lr, lambda_lr, weight_decay
        self.lm_weight, self.distill_weight, self.distill_temperature = lm_weight, distill_weight, distill_temperature
        self.tau_start, self.tau_end, self.tau_fraction = tau_start, tau_end, tau_fraction
        cosine_tau(0, 1, tau_start, tau_end, tau_fraction)  # a bad temperature fails here, not after data setup
        self.automatic_optimization = False
        self.strict_loading = False
        self.last_routing: list[dict[str, Any]] = []
        self.val_score = MeanMetric()
        self.val_sparsity = MeanMetric()
        if gradient_checkpointing:
            enable_activation_checkpointing(flux_model.backbone)

    # -- schedule -------------------------------------------------------------------------------------------------
    def total_steps(self) -> int:
        trainer = getattr(self, "_trainer", None)
        if trainer is None or trainer.max_steps is None or trainer.max_steps < 0:
            return int(getattr(trainer, "estimated_stepping_batches", 1) or 1) if trainer else 1
        return trainer.max_steps

    def current_tau(self) -> float:
        return cosine_tau(self.global_step, self.total_steps(), self.tau_start, self.tau_end, self.tau_fraction)

    def targets(self) -> torch.Tensor:
        return torch.tensor([self.target.target(t, self.global_step) for t in self.tasks], device=self.device)

    # -- forward --------------------------------------------------------------------------------------------------
    def routed_forward(self, batch: dict[str, Any], **outputs: Any) -> tuple[Any, RouterPlan]:
        """The routed forward; `outputs` picks what it returns (`hidden_at=` rows, or `logits_to_keep=`)."""
        plan = self.router.as_plan()
        out = self.flux_model(batch["input_ids"], batch["attention_mask"], plan=plan, segments=batch.get("segments"),
                              **outputs)
        return out, plan

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        router_opt, lambda_opt = self.optimizers()
        self.router.train()
        self.router.set_tau(self.current_tau())
        # logits only where the losses read them (answer rows): the student's LM head runs on their hidden states,
        # the teacher keeps the trailing window that holds them (flux.objectives.answer_losses)
        labels = batch["labels"]
        rows = answer_rows(labels)
        teacher = None
        if self.distill_weight > 0:
            # the all-FA teacher runs first: the routed forward must be the model's last one, because gradient
            # checkpointing recomputes layers during backward under the model's active routing state
            window = answer_window(rows)
            with torch.no_grad():
                teacher = self.flux_model(batch["input_ids"], batch["attention_mask"], plan="dense",
                                          logits_to_keep=window).logits[rows[:, -window:]]
        out, plan = self.routed_forward(batch, hidden_at=rows)
        b = batch["input_ids"].shape[0]
        lm, kl = answer_losses(out.hidden, self.flux_model.lm_head, labels[:, 1:][rows[:, :-1]], teacher,
                               self.distill_temperature)
        loss = self.lm_weight * lm
        if kl is not None:
            loss = loss + self.distill_weight * kl
        gates = {i: plan.soft[i] for i in plan.logits}
        # straight-through gates of the routed layers: hard values whose gradient reaches the router (also for the
        # global router, whose early layers have no gate and leave out.gates None)
        hard_gates = {i: plan.gates[i] for i in plan.logits}
        s = sample_sparsity(hard_gates, self.flux_model.num_layers, b, self.device)
        s_soft = sample_sparsity(gates, self.flux_model.num_layers, b, self.device)
        targets = self.targets()
        penalty, per_task = self.constraint(s, batch["task_ids"].to(self.device), targets)
        total = loss + penalty
        router_opt.zero_grad(set_to_none=True)
        lambda_opt.zero_grad(set_to_none=True)
        self.manual_backward(total)
        router_opt.step()
        # the raw optimizer: Lightning counts global steps per wrapped optimizer.step(), and one training step
        # must stay one step for schedules, checkpoints and max_steps
        lambda_opt.optimizer.step()
        with torch.no_grad():
            self.constraint.lambda1.clamp_(min=0)
            self.constraint.lambda2.clamp_(min=0)
        logs = {"train/loss": total.detach(), "train/loss_lm": lm.detach(), "train/penalty": penalty.detach(),
                "train/sparsity_soft": s_soft.mean(), "train/sparsity_hard": out.decisions.float().mean(),
                "train/tau": float(self.router.tau), "train/target": targets.mean(),
                "train/lambda1": self.constraint.lambda1.mean().detach(),
                "train/lambda2": self.constraint.lambda2.mean().detach()}
        if kl is not None:
            logs["train/loss_kl"] = kl.detach()
        for name, value in per_task.items():
            logs[f"train/sparsity/{name}"] = value
        for i in range(self.flux_model.num_layers):
            logs[f"train/layer_sparsity/{i:02d}"] = out.decisions[:, i].float().mean()
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=b)
        self._remember(batch, out.decisions, out.gates)
        return total.detach()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.router.eval()
        window = answer_window(answer_rows(batch["labels"]))
        with torch.no_grad():
            out, _ = self.routed_forward(batch, logits_to_keep=window)
            lm = answer_lm_loss(out.logits, batch["labels"][:, -window:])
        b = batch["input_ids"].shape[0]
        sparsity = out.decisions.float().mean(dim=1)
        self.log("val/loss_lm", lm, on_epoch=True, batch_size=b, sync_dist=True)
        self.log("val/sparsity_hard", sparsity.mean(), on_epoch=True, batch_size=b, sync_dist=True)
        task_ids = batch["task_ids"]
        for k, name in enumerate(self.tasks):
            sel = task_ids == k
            if bool(sel.any()):
                self.log(f"val/sparsity/{name}", sparsity[sel].mean(), on_epoch=True, batch_size=int(sel.sum()),
                         sync_dist=True)
        self._remember(batch, out.decisions, None)

    def _remember(self, batch: dict[str, Any], decisions: torch.Tensor, gates: torch.Tensor | None) -> None:
        """Keep the last batch's routing as records (the routing.jsonl format) for the heatmap callback."""
        tasks = batch.get("tasks") or [self.tasks[int(k)] for k in batch["task_ids"]]
        self.last_routing = [
            {"id": str(i), "task": tasks[i], "task_type": self.task_types.get(tasks[i], "retrieval"),
             "length": int(batch["attention_mask"][i].sum()),
             "decisions": decisions[i].int().tolist(),
             "gates": gates[i].float().tolist() if gates is not None else None, "score": None}
            for i in range(decisions.shape[0])]

    def configure_optimizers(self):
        router_opt = torch.optim.AdamW(self.router.parameters(), lr=self.router_lr, weight_decay=self.weight_decay)
        lambda_opt = torch.optim.SGD(self.constraint.parameters(), lr=self.lambda_lr, maximize=True)
        return [router_opt, lambda_opt]

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if not k.startswith(BACKBONE_PREFIX)}
        checkpoint["flux"] = {"backbone": self.flux_model.backbone.name, "tasks": self.tasks,
                              "router": router_config_dict(self.router),
                              "sparse": self.flux_model.pattern.describe()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Runs before Lightning loads the state: refuse another backbone or task set, and reorder the per-task
        multipliers when the same tasks come in another order (flux.train checks everything else before fit)."""
        saved = checkpoint.get("flux", {})
        check_backbone(saved.get("backbone"), self.flux_model.backbone.name)
        if saved.get("tasks"):
            remap_tasks(checkpoint, list(saved["tasks"]), self.tasks)
        # the optimizer states carry the learning rates they were saved with; this run's settings win
        settings = ({"lr": self.router_lr, "weight_decay": self.weight_decay}, {"lr": self.lambda_lr})
        for state, values in zip(checkpoint.get("optimizer_states") or [], settings):
            for group in state.get("param_groups", []):
                group.update(values)


def export_router(router: LayerRouter, out_dir: str | Path, backbone: str, pattern: dict[str, Any],
                  summary: dict[str, Any] | None = None) -> Path:
    """Write router.safetensors + router.json (enough to rebuild and run the router without Lightning)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in router.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=".router.", dir=out)
    os.close(fd)
    save_file(tensors, tmp)
    os.replace(tmp, out / "router.safetensors")
    meta = {"backbone": backbone, "num_layers": router.num_layers, "head_dim": router.head_dim,
            "sparse": pattern, "router": router_config_dict(router), "training": summary or {}}
    (out / "router.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


class RouterCheckpointError(FluxUserError):
    """A router checkpoint is missing, malformed, or made for another backbone."""


def check_router_files(path: str | Path | None) -> tuple[Path, Path]:
    """(weights, metadata) paths of an exported router (its folder or its router.safetensors), or a clear error."""
    if not path:
        raise RouterCheckpointError("a router is needed but no checkpoint was given; pass routing.checkpoint=PATH "
                                    "(a folder with router.safetensors and router.json, as written by flux.train)")
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    weights, meta_path = folder / "router.safetensors", folder / "router.json"
    if not weights.is_file() or not meta_path.is_file():
        raise RouterCheckpointError(f"router checkpoint {str(path)!r} needs router.safetensors and router.json in "
                                    f"{folder}; export one with flux.train (it writes both at the end)")
    return weights, meta_path


def load_router(path: str | Path, backbone_name: str | None = None, num_layers: int | None = None
                ) -> tuple[LayerRouter, dict[str, Any]]:
    """Load an exported router (folder or router.safetensors path); checks backbone and layer count when given."""
    weights, meta_path = check_router_files(path)
    meta = json.loads(meta_path.read_text())
    if backbone_name is not None and meta.get("backbone") != backbone_name:
        raise RouterCheckpointError(f"router {str(path)!r} was trained for backbone {meta.get('backbone')!r}, not "
                                    f"{backbone_name!r}; use the matching backbone or retrain the router")
    if num_layers is not None and meta.get("num_layers") != num_layers:
        raise RouterCheckpointError(f"router {str(path)!r} routes {meta.get('num_layers')} layers but the backbone "
                                    f"has {num_layers}; it belongs to another model")
    cfg = {k: v for k, v in meta["router"].items() if k not in ("num_layers", "head_dim")}
    router = LayerRouter(meta["num_layers"], meta["head_dim"], RouterConfig(**cfg))
    router.load_state_dict(load_file(str(weights)))
    return router.eval(), meta
