"""All-or-nothing file writes: a hidden temp file beside the target, fsync, os.replace, then an fsync of the folder.

A reader sees the old file or the new one, never a torn one, and the folder fsync makes the rename itself survive a
power loss. Files end up with mode 0644 like any file a user writes (mkstemp alone would leave 0600, unreadable to
the group that shares a checkpoint folder). A failed write removes its temp file; a process killed outright (SIGKILL,
power loss) cannot, so every writer first removes the temp files a killed predecessor left for the same target.
"""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO

FILE_MODE = 0o644
TEMP_SUFFIX = ".tmp"


def temp_prefix(target: Path) -> str:
    """Temp files of `target` are `.<name>.<random>.tmp` in its folder: hidden, and found again by name."""
    return f".{target.name}."


def remove_stale_temps(folder: str | os.PathLike, name_pattern: str) -> list[Path]:
    """Delete the temp files that interrupted writes of the files matching `name_pattern` (a glob such as
    `router.json` or `*.ckpt`) left in `folder`; returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = sorted(folder.glob(f".{name_pattern}.*{TEMP_SUFFIX}"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make renames inside `folder` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _new_temp(target: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(target), suffix=TEMP_SUFFIX, dir=target.parent)
    os.close(fd)
    return Path(tmp)


def _finish_temp(tmp: Path) -> None:
    """fsync the finished temp file's data and give it the normal file mode before it is renamed into place."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, FILE_MODE)


def write_files_atomically(writers: Mapping[str | os.PathLike, Callable[[Path], None]]) -> list[Path]:
    """Write several files of one folder as a unit: every `writer(temp_path)` runs first (and is fsynced), and only
    when all succeeded are the temps renamed onto their targets, in the given order, then the folder is fsynced.

    A failure before the renames leaves every target as it was and no temp file behind. The renames themselves are
    not one atomic step: readers of several files detect a half-done commit by a digest (see flux.router)."""
    targets = [Path(t) for t in writers]
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target.parent, glob.escape(target.name))
    temps: list[Path] = []
    try:
        for target, write in zip(targets, writers.values(), strict=True):
            temps.append(_new_temp(target))
            write(temps[-1])
            _finish_temp(temps[-1])
        for tmp, target in zip(temps, targets, strict=True):
            os.replace(tmp, target)
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise
    for folder in {t.parent for t in targets}:
        fsync_dir(folder)
    return targets


@contextmanager
def atomic_open(target: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """`with atomic_open(path) as f: ...` writes `path` all or nothing (see the module docstring)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent, glob.escape(target.name))
    tmp = _new_temp(target)
    try:
        with open(tmp, mode) as f:
            yield f
        _finish_temp(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
