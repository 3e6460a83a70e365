"""Lightning glue: FluxLitModule trains only the router (and the Lagrange multipliers) on a frozen backbone.

Checkpoints hold the router, lambdas, optimiser states and step, never the backbone (it is rebuilt from its source at
resume), and are written through `AtomicCheckpointIO` (flux.atomic: temp file, fsync, rename), so a crash loses at most
the steps since the last checkpoint and never leaves a truncated file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torchmetrics import MeanMetric

from flux.atomic import atomic_open, remove_stale_temps
from flux.backbone import enable_activation_checkpointing
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
from flux.router import LayerRouter, RouterPlan, cosine_tau, router_config_dict

BACKBONE_PREFIX = "flux_model."


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save through flux.atomic: hidden temp file, fsync, rename, folder fsync, mode 0644, so a crash never
    leaves a truncated checkpoint. At its first save into a folder it removes the temp files of checkpoints that a
    killed run (SIGKILL, power loss) was writing there."""

    def __init__(self) -> None:
        super().__init__()
        self._swept: set[Path] = set()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        target = Path(path)
        if target.parent not in self._swept:
            remove_stale_temps(target.parent, "*.ckpt")
            self._swept.add(target.parent)
        with atomic_open(target) as f:
            torch.save(checkpoint, f)


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
        self.last_routing: list[dict[str, Any]] = []  # the last training batch, as routing.jsonl records
        self.val_routing: list[dict[str, Any]] = []  # every sample of the current validation pass
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
        self.last_routing = self._routing_records(batch, out.decisions, out.gates)
        return total.detach()

    def on_validation_epoch_start(self) -> None:
        self.val_routing = []

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
        self.val_routing += self._routing_records(batch, out.decisions, None, first_id=len(self.val_routing))

    def _routing_records(self, batch: dict[str, Any], decisions: torch.Tensor, gates: torch.Tensor | None,
                         first_id: int = 0) -> list[dict[str, Any]]:
        """A batch's routing as routing.jsonl records (score null: nothing is scored here), for the heatmaps."""
        tasks = batch.get("tasks") or [self.tasks[int(k)] for k in batch["task_ids"]]
        return [
            {"id": str(first_id + i), "task": tasks[i], "task_type": self.task_types.get(tasks[i], "retrieval"),
             "length": int(batch["attention_mask"][i].sum()),
             "decisions": decisions[i].int().tolist(),
             "gates": gates[i].float().tolist() if gates is not None else None, "score": None}
            for i in range(decisions.shape[0])]

    def training_summary(self) -> dict[str, Any]:
        """How training ended, for router.json, the model card and the end-of-run printout: steps, final loss, and Ω
        per task against its target. Ω comes from the last validation pass when there was one (every validation
        sample counts), else from each task's last training batch."""
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if torch.as_tensor(v).numel() == 1}
        val = {t: metrics[f"val/sparsity/{t}"] for t in self.tasks if f"val/sparsity/{t}" in metrics}
        train = {t: metrics[f"train/sparsity/{t}"] for t in self.tasks if f"train/sparsity/{t}" in metrics}
        sparsity, source = (val, "last validation pass") if val else (train, "last training batch of each task")
        return {"steps": self.global_step, "tasks": self.tasks,
                "task_types": {t: self.task_types.get(t, "retrieval") for t in self.tasks},
                "targets": {t: self.target.target(t, self.global_step) for t in self.tasks},
                "sparsity": sparsity, "sparsity_source": source, "final_loss": metrics.get("train/loss"),
                "final_metrics": metrics}

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

