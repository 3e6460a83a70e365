"""Where an evaluation's numbers come from: the `provenance` object of results.json (its shape is stated in
flux.evals.results, the one schema module; this module only gathers the facts).

A sweep of training runs becomes a table only if every results.json says which run it is: the Hydra overrides that
define the run (the swept values the table labels its rows with), the router evaluated (path or Hub id, and the
sha256 of its weights), the seeds, the evaluation split, and the code (git commit, whether the tree was dirty, the
flux version) and date. Nothing here needs Hydra: outside a Hydra run the caller passes its own override list.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

DISTRIBUTION = "flux-attention"
# Where the GPU copy of a checkout has no .git folder, the caller can say which commit it is.
COMMIT_ENV = "FLUX_CODE_COMMIT"
# Keys of a task config that say how to build it, not what it evaluates.
_BUILD_KEYS = ("_target_", "_convert_", "_recursive_", "_partial_")


def hydra_task_overrides() -> list[str] | None:
    """The overrides the user gave this Hydra run or multirun job (None outside Hydra: compose(), a notebook)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return list(HydraConfig.get().overrides.task)


def _git(root: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def code_state(package_dir: Path | None = None) -> dict[str, Any]:
    """{"commit", "dirty"} of the checkout flux runs from. Only a checkout whose top level holds this very `flux/`
    folder counts: an installed flux inside some other repository (a venv in a project) reports null rather than
    that repository's commit. `FLUX_CODE_COMMIT` names the commit where no .git folder came along (a copied tree);
    `dirty` is then null (unknown)."""
    package = (package_dir or Path(__file__).resolve().parents[1]).resolve()
    top = _git(package, "rev-parse", "--show-toplevel")
    if top is not None and Path(top).resolve() == package.parent:
        commit = _git(package, "rev-parse", "HEAD")
        status = _git(package, "status", "--porcelain")
        return {"commit": commit, "dirty": None if status is None else bool(status)}
    return {"commit": os.environ.get(COMMIT_ENV) or None, "dirty": None}


def flux_version() -> str | None:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
        return None


def now_utc() -> str:
    """The current time as ISO 8601 UTC to the second, e.g. 2026-12-01T09:30:00Z."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def task_settings(task_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The evaluation task's settings without the keys that only say how to build it."""
    return {k: v for k, v in task_cfg.items() if k not in _BUILD_KEYS}


def build_provenance(*, overrides: Sequence[str], checkpoint: Mapping[str, str] | None, seeds: Mapping[str, Any],
                     task: Mapping[str, Any] | None, date: str) -> dict[str, Any]:
    """The provenance object of results.json (validated with the results by flux.evals.results)."""
    return {"overrides": [str(o) for o in overrides], "checkpoint": None if checkpoint is None else dict(checkpoint),
            "seeds": {k: (None if v is None else int(v)) for k, v in seeds.items()},
            "task": None if task is None else dict(task), "code": code_state(), "flux_version": flux_version(),
            "date": date}
