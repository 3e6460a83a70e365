"""Checks the entry points run before any weights or data load, so a bad setting costs seconds, not a run.

Each check raises one ConfigError naming the setting and the fix, or warns (FluxWarning, one line under the CLI)
when a legal setting probably does not do what the user wants.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from flux.attention.patterns import SparsePattern
from flux.errors import ConfigError, warn


def check_writable_dir(path: str | Path, key: str) -> Path:
    """Create the folder if needed and prove a file can be written there (a run must not fail at its very end)."""
    folder = Path(path).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".flux-write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(f"{key}={folder} is not a writable folder ({err.strerror or err.__class__.__name__}); "
                          f"set {key} to a folder you can write") from err
    return folder


def check_writable_file(path: str | Path, key: str) -> Path:
    """A file path whose folder is writable and which is not itself a folder."""
    target = Path(path).expanduser()
    if target.is_dir():
        return check_writable_dir(target, key)
    check_writable_dir(target.parent, key)
    if target.exists() and not os.access(target, os.W_OK):
        raise ConfigError(f"{key}={target} exists and is not writable; set {key} to a file you can write")
    return target


def check_device(device: str | None, key: str = "device") -> torch.device:
    """A torch device string that exists on this machine (None means cpu)."""
    name = "cpu" if device in (None, "") else str(device)
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"{key}={name!r} is not a device; use cpu, cuda or cuda:N") from err
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{key}={name!r} but no CUDA device is visible; use {key}=cpu")
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"{key}={name!r} but only {count} CUDA device(s) are visible; use one of "
                              f"cuda:0..cuda:{count - 1}")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise ConfigError(f"{key}={name!r} is not a device flux runs on; use cpu, cuda or cuda:N")
    return dev


def check_sa_backend(sa_backend: str, device_type: str, key: str = "attention.sa_backend") -> None:
    """The Triton SA kernels need a CUDA device, or Triton's CPU interpreter (TRITON_INTERPRET=1, slow, for tests)."""
    if sa_backend == "triton" and device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"{key}=triton runs Triton kernels, which need a CUDA device, and this run is on "
                          f"{device_type}; use {key}=auto (or set TRITON_INTERPRET=1 to interpret them on CPU, slowly)")


def warn_if_window_covers(pattern: SparsePattern, longest_prompt: int, where: str) -> bool:
    """Warn when every prompt fits inside the pattern's sink + window: SA then sees every token, keeps the whole KV
    cache, and is indistinguishable from FA. Returns whether it warned."""
    budget = pattern.kv_policy()
    if budget is None or longest_prompt <= 0:
        return False
    sink, window = budget
    if longest_prompt <= sink + window:
        warn(f"{where}: the sparse pattern's sink {sink} + window {window} covers every prompt (the longest has "
             f"{longest_prompt} tokens), so sparse attention sees every token and saves no KV memory; lower "
             "sparse.window (and sparse.sink) below the prompt length to route anything")
        return True
    return False
