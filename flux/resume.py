"""Resuming router training: read a `resume=` checkpoint and check it against the run before Lightning touches it.

A flux checkpoint (written by FluxLitModule.on_save_checkpoint) carries a `flux` section: the backbone name, the
task list (the order of the per-task Lagrange multipliers), the router config and the sparse pattern. Without these
checks a resume with another task count or router shape dies in a raw size-mismatch dump, and a resume with the same
tasks in another order silently hands each task's multiplier to another task. Here: a file that is missing, a
folder, empty, truncated or garbage is one line naming the file; a different backbone, task set, router config or
pattern is one line naming what differs; the same tasks in another order are remapped by name (`remap_tasks`).
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flux.errors import FluxUserError

# Task-indexed tensors of the LightningModule's state (one entry per task, in the module's task order).
TASK_STATE_KEYS = ("constraint.lambda1", "constraint.lambda2")
# Router settings that shape its weights or its decisions; tau follows the schedule and init_fa_bias only matters
# before the first step, so neither has to match.
ROUTER_KEYS = ("kind", "pool_size", "hidden", "pooling", "read_layer", "threshold", "num_layers", "head_dim")
# The lambda optimizer is the second of FluxLitModule.configure_optimizers.
LAMBDA_OPTIMIZER = 1


# `resume=auto`: continue from the run folder's own last checkpoint when there is one, else start fresh. A sweep rerun
# into the same folders (a preempted or time-limited job) then retrains nothing that finished.
AUTO = "auto"
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"


class ResumeError(FluxUserError):
    """A `resume=` checkpoint cannot be read, or was trained under a different setup than this run."""


@dataclass(frozen=True)
class ResumePoint:
    """What a checkpoint says about the run it came from."""

    path: Path
    step: int
    backbone: str | None
    tasks: list[str]
    router: dict[str, Any]
    sparse: dict[str, Any] | None  # None in checkpoints written before the pattern was recorded
    router_state: dict[str, torch.Tensor]


def _other_checkpoints(folder: Path) -> str:
    found = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
    return f"; checkpoints in {folder}: {', '.join(found)}" if found else ""


def resume_path(resume: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint `resume=` names: None (start fresh) for null, and for `auto` when the run folder has no
    checkpoints/last.ckpt yet; `auto` otherwise means that file."""
    if not resume:
        return None
    if str(resume) == AUTO:
        last = Path(output_dir) / LAST_CHECKPOINT
        return last if last.is_file() else None
    return Path(resume)


def read_checkpoint(path: str | Path) -> ResumePoint:
    """Load a training checkpoint's flux section, or raise one ResumeError naming the file and what is wrong."""
    p = Path(path).expanduser()
    if p.is_dir():
        inside = [c for c in (p / "last.ckpt", p / "checkpoints" / "last.ckpt") if c.is_file()]
        hint = f"e.g. resume={inside[0]}" if inside else "e.g. resume=<run>/checkpoints/last.ckpt"
        raise ResumeError(f"resume={p} is a folder, not a checkpoint file; give the file, {hint}")
    if not p.is_file():
        raise ResumeError(f"resume={p} does not exist; give a checkpoint file such as <run>/checkpoints/last.ckpt"
                          f"{_other_checkpoints(p.parent)}")
    if p.stat().st_size == 0:
        raise ResumeError(f"resume={p} is empty (0 bytes); resume from another checkpoint of the run"
                          f"{_other_checkpoints(p.parent)}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        reason = " ".join(str(err).split())[:120] or err.__class__.__name__
        raise ResumeError(f"resume={p} is not a readable checkpoint (truncated or corrupt: {reason}); resume from "
                          f"another checkpoint of the run{_other_checkpoints(p.parent)}") from err
    saved = ckpt.get("flux") if isinstance(ckpt, dict) else None
    if not isinstance(saved, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ResumeError(f"resume={p} is not a flux training checkpoint (no 'flux' section); give a .ckpt file "
                          "written by flux.train")
    state = ckpt["state_dict"]
    return ResumePoint(path=p, step=int(ckpt.get("global_step", 0)), backbone=saved.get("backbone"),
                       tasks=list(saved.get("tasks") or []), router=dict(saved.get("router") or {}),
                       sparse=saved.get("sparse"),
                       router_state={k.removeprefix("router."): v for k, v in state.items()
                                     if k.startswith("router.")})


def check_backbone(saved: str | None, backbone: str) -> None:
    if saved not in (None, backbone):
        raise ResumeError(f"checkpoint was trained on backbone {saved!r}, not {backbone!r}; resume with the same "
                          "backbone (backbone.source) or start a new run without resume=")


def _differences(saved: dict[str, Any], current: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    return [f"{k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now" for k in keys
            if k in saved and k in current and saved[k] != current[k]]


def check_router(point: ResumePoint, router: dict[str, Any]) -> None:
    """`router` is flux.router.router_config_dict(...) or its config part (without num_layers/head_dim)."""
    diff = _differences(point.router, router, ROUTER_KEYS)
    if diff:
        raise ResumeError(f"resume={point.path} was trained with another router config ({', '.join(diff)}); "
                          "resume with the checkpoint's router.* settings or start a new run without resume=")


def check_pattern(point: ResumePoint, pattern: dict[str, Any]) -> None:
    """`pattern` is SparsePattern.describe() of this run."""
    if point.sparse is not None and point.sparse != pattern:
        keys = tuple(sorted(set(point.sparse) | set(pattern)))
        diff = _differences({k: point.sparse.get(k) for k in keys}, {k: pattern.get(k) for k in keys}, keys)
        raise ResumeError(f"resume={point.path} was trained with another sparse pattern ({', '.join(diff)}); "
                          "resume with the checkpoint's sparse.* settings or start a new run without resume=")


def check_tasks(saved: list[str], tasks: list[str], where: str = "the checkpoint") -> None:
    """The same task set (any order) or a ResumeError naming the missing and extra tasks."""
    if sorted(saved) != sorted(tasks):
        missing, extra = sorted(set(saved) - set(tasks)), sorted(set(tasks) - set(saved))
        raise ResumeError(f"{where} was trained on tasks {saved} but this run has {tasks} (missing {missing}, new "
                          f"{extra}); each task has its own Lagrange multipliers, so resume with the same data.tasks "
                          "(any order) or start a new run without resume=")


def remap_tasks(checkpoint: dict[str, Any], saved: list[str], tasks: list[str]) -> None:
    """Reorder the checkpoint's task-indexed state (multipliers and their optimizer state) in place from the saved
    task order to this run's order, so every task keeps its own multiplier."""
    check_tasks(saved, tasks)
    if saved == tasks:
        return
    order = torch.tensor([saved.index(t) for t in tasks])
    state = checkpoint["state_dict"]
    for key in TASK_STATE_KEYS:
        if key in state:
            state[key] = state[key][order]
    optimizers = checkpoint.get("optimizer_states") or []
    if len(optimizers) > LAMBDA_OPTIMIZER:
        for per_param in optimizers[LAMBDA_OPTIMIZER].get("state", {}).values():
            for name, value in per_param.items():
                if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == len(tasks):
                    per_param[name] = value[order]
