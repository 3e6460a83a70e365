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
from torch.utils.checkpoint import checkpoint

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


# Answer rows whose fp32 logits one chunk of `answer_losses` holds at once (x vocabulary x 4 bytes, a few times over
# for the log-softmax and its gradient): 256 rows of a 152k vocabulary are 150 MiB.
ANSWER_CHUNK_ROWS = 256


def answer_rows(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the positions whose logits the answer losses read (position t predicts labels[:, t + 1]).

    The LM head only needs to run there: at 32k tokens on a 152k vocabulary the full [B, T, V] logits are ~10 GB in
    bf16 per sample and twice that in fp32, while a synthetic answer is a few dozen tokens."""
    rows = torch.zeros_like(labels, dtype=torch.bool)
    rows[:, :-1] = labels[:, 1:] != -100
    if not bool(rows.any()):
        raise ObjectiveError("batch has no answer tokens to train on (every label is -100)")
    return rows


def answer_window(rows: torch.Tensor) -> int:
    """How many trailing positions hold every answer row: the `logits_to_keep` that covers the answer losses for
    a forward that can only keep the last k positions (the inference engine; answers sit at the end of left-padded
    prompts, so k is about the longest answer)."""
    used = rows.any(dim=0).nonzero()
    return int(rows.shape[1] - used[0, 0]) if used.numel() else 0


def answer_losses(hidden: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor,
                  teacher_logits: torch.Tensor | None = None, temperature: float = 1.0,
                  chunk_rows: int = ANSWER_CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(answer LM loss, KL(teacher || student) or None) from the final hidden states of the answer rows only.

    `hidden` [N, d] are the student's final (normed) hidden states at `answer_rows` (row-major order), `targets`
    [N] the tokens they predict, `teacher_logits` [N, V] the all-FA teacher's logits at the same rows. Equal to
    `answer_lm_loss` / `answer_kl` on full logits (within fp32 rounding), but the LM head runs on N rows instead of
    B x T, in chunks of `chunk_rows`, and each chunk is checkpointed: its logits, their fp32 copy and the
    log-softmaxes exist for one chunk at a time, in the forward and again in the backward."""
    n = hidden.shape[0]
    if n == 0:
        raise ObjectiveError("batch has no answer tokens to train on (every label is -100)")
    if targets.shape != (n,) or (teacher_logits is not None and teacher_logits.shape[0] != n):
        raise ValueError(f"answer_losses needs one target (and teacher row) per hidden row: hidden {tuple(hidden.shape)}"
                         f", targets {tuple(targets.shape)}, teacher "
                         f"{None if teacher_logits is None else tuple(teacher_logits.shape)}")
    with_kl = teacher_logits is not None

    def chunk_sums(h: torch.Tensor, tgt: torch.Tensor, teacher: torch.Tensor | None) -> torch.Tensor:
        logits = lm_head(h).float()
        ce = F.cross_entropy(logits, tgt, reduction="sum")
        if teacher is None:
            return ce[None]
        s = (logits / temperature).log_softmax(-1)
        t = (teacher.float() / temperature).log_softmax(-1)
        return torch.stack([ce, F.kl_div(s, t, log_target=True, reduction="sum")])

    total = hidden.new_zeros(2 if with_kl else 1, dtype=torch.float32)
    for lo in range(0, n, chunk_rows):
        hi = min(n, lo + chunk_rows)
        teacher = teacher_logits[lo:hi] if with_kl else None
        if hidden.requires_grad:
            sums = checkpoint(chunk_sums, hidden[lo:hi], targets[lo:hi], teacher, use_reentrant=False)
        else:
            sums = chunk_sums(hidden[lo:hi], targets[lo:hi], teacher)
        total = total + sums
    lm = total[0] / n
    kl = total[1] / n * temperature ** 2 if with_kl else None
    return lm, kl


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
