"""Training objectives for the router: answer-token LM loss, optional self-distillation, and a min-max sparsity
constraint with learnable Lagrange multipliers per task.

The constraint for task k is  lambda1_k * |s_k - t_k| + lambda2_k * (s_k - t_k)^2  where s_k is the batch's mean
fraction of SA layers over the samples of task k and t_k the (ramped) target. The router minimises it; the lambdas
maximise it (their optimiser runs with maximize=True), so they keep growing while the target is missed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from flux.errors import FluxUserError


class ObjectiveError(FluxUserError):
    """An invalid objective setting (target, ramp, weights)."""


def answer_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over answer tokens (labels are aligned with inputs; -100 elsewhere)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    if not bool((shift_labels != -100).any()):
        raise ObjectiveError("batch has no answer tokens to train on (every label is -100)")
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=-100)


def answer_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) on answer positions: the all-FA backbone teaches its routed self."""
    sel = labels[:, 1:] != -100
    s = student_logits[:, :-1][sel].float() / temperature
    t = teacher_logits[:, :-1][sel].float() / temperature
    return F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="batchmean") * temperature ** 2


@dataclass
class TargetSchedule:
    """Sparsity target per task, ramped linearly from `start` to each task's end value over `ramp_steps`."""

    end: float = 0.5
    start: float = 0.0
    ramp_steps: int = 100
    per_task: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value in [("end", self.end), ("start", self.start), *self.per_task.items()]:
            if not 0.0 <= float(value) <= 1.0:
                raise ObjectiveError(f"target sparsity {name}={value} must lie in [0, 1] (fraction of SA layers)")
        if self.ramp_steps < 0:
            raise ObjectiveError(f"target ramp_steps must be >= 0, got {self.ramp_steps}")

    def target(self, task: str, step: int) -> float:
        end = float(self.per_task.get(task, self.end))
        if self.ramp_steps == 0:
            return end
        frac = min(1.0, step / self.ramp_steps)
        start = min(self.start, end)
        return start + (end - start) * frac


class SparsityConstraint(nn.Module):
    """Per-task Lagrangian penalty with learnable lambda1, lambda2 (initialised at zero, kept >= 0 when read)."""

    def __init__(self, tasks: list[str]) -> None:
        super().__init__()
        if not tasks:
            raise ObjectiveError("the sparsity constraint needs at least one task name")
        self.tasks = list(tasks)
        self.lambda1 = nn.Parameter(torch.zeros(len(tasks)))
        self.lambda2 = nn.Parameter(torch.zeros(len(tasks)))

    def forward(self, sparsity: torch.Tensor, task_ids: torch.Tensor, targets: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """sparsity [B] (differentiable), task_ids [B], targets [n_tasks] -> (penalty, per-task mean sparsity)."""
        penalty = sparsity.new_zeros(())
        per_task: dict[str, torch.Tensor] = {}
        for k, name in enumerate(self.tasks):
            sel = task_ids == k
            if not bool(sel.any()):
                continue
            s_k = sparsity[sel].mean()
            gap = s_k - targets[k]
            penalty = penalty + self.lambda1[k] * gap.abs() + self.lambda2[k] * gap ** 2
            per_task[name] = s_k.detach()
        return penalty, per_task


def sample_sparsity(gates: dict[int, torch.Tensor], num_layers: int, batch: int, device: torch.device
                    ) -> torch.Tensor:
    """Fraction of SA layers per sample from FA gates z (1 - z summed over routed layers; unrouted layers are FA)."""
    total = torch.zeros(batch, device=device)
    for z in gates.values():
        total = total + (1.0 - z.float())
    return total / num_layers
