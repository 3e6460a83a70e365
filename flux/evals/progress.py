"""An evaluation folder that never loses work: routing.jsonl grows one line per finished sample, and a rerun of the
same evaluation into the same folder continues where the last one stopped.

The folder holds `eval_config.json` (everything that decides the results: the resolved config, the effective
sparse pattern, a digest of the router; plus `started`, when the evaluation first started, which results.json's
provenance reports and a resumed run keeps) next to routing.jsonl. A rerun with the same identity reads the lines
already there, checks that they are the first samples of the evaluation order, and appends the rest; a rerun with
another identity is refused (mixing two configurations in one results.json would be silently wrong). A line torn by
a kill mid-write is dropped (its sample is evaluated again). Lines are appended per batch with one write, a flush and
an fsync, so an uninterrupted run and an interrupted-then-resumed run end with the same bytes.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flux.errors import FluxUserError
from flux.evals.provenance import now_utc
from flux.evals.results import ROUTING_FILE, SampleRecord, read_routing, routing_line

CONFIG_FILE = "eval_config.json"
# The key of eval_config.json that records when the evaluation started; not part of its identity.
STARTED_KEY = "started"


class EvalResumeError(FluxUserError):
    """An output folder holds another evaluation's samples, or samples that do not match this evaluation."""


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): node}


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any], limit: int = 4) -> list[str]:
    """`key: saved there, current here` for the first `limit` differing leaves (dotted keys)."""
    a, b = _flatten(saved), _flatten(current)
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
    shown = [f"{k}: {a.get(k, '<unset>')!r} there, {b.get(k, '<unset>')!r} now" for k in keys[:limit]]
    return shown + ([f"{len(keys) - limit} more"] if len(keys) > limit else [])


class EvalProgress:
    """routing.jsonl + eval_config.json of one evaluation folder (see the module docstring)."""

    def __init__(self, folder: str | Path, identity: Mapping[str, Any]) -> None:
        self.folder = Path(folder)
        self.identity = json.loads(json.dumps(identity))  # the form it takes on disk (tuples become lists)
        self.routing = self.folder / ROUTING_FILE
        self.config = self.folder / CONFIG_FILE
        self.started: str | None = None  # set by start(): when this evaluation first started (ISO 8601 UTC)

    def start(self) -> list[dict[str, Any]]:
        """Check the folder against this evaluation and return the routing lines already written (maybe none).
        Writes eval_config.json, so an unwritable folder fails here, before any model work."""
        self.folder.mkdir(parents=True, exist_ok=True)
        lines: list[dict[str, Any]] = []
        saved: dict[str, Any] = {}
        if self.routing.is_file() and self.routing.stat().st_size > 0:
            saved = self._check_identity()
            lines = self._read_lines()
        self.started = saved.get(STARTED_KEY) if lines and saved.get(STARTED_KEY) else now_utc()
        tmp = self.config.with_name(f".{CONFIG_FILE}.tmp")
        content = {**self.identity, STARTED_KEY: self.started}
        tmp.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, self.config)
        if not lines and self.routing.exists():
            self.routing.unlink()
        return lines

    def _check_identity(self) -> dict[str, Any]:
        """The saved eval_config.json, after checking that it describes this evaluation."""
        fix = f"use another output_dir, or delete {self.folder} to start over"
        if not self.config.is_file():
            raise EvalResumeError(f"{self.routing} exists but {self.config.name} does not, so it cannot be checked "
                                  f"against this evaluation; {fix}")
        try:
            saved = json.loads(self.config.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise EvalResumeError(f"{self.config} is not valid JSON ({err}); {fix}") from err
        if not isinstance(saved, dict):
            raise EvalResumeError(f"{self.config} is not an object; {fix}")
        identity = {k: v for k, v in saved.items() if k != STARTED_KEY}
        if identity != self.identity:
            diff = ", ".join(config_differences(identity, self.identity))
            raise EvalResumeError(f"{self.folder} holds an evaluation with another config ({diff}); {fix}")
        return saved

    def _read_lines(self) -> list[dict[str, Any]]:
        data = self.routing.read_bytes()
        if not data.endswith(b"\n"):  # a kill in the middle of a write: drop the torn line, redo its sample
            keep = data.rfind(b"\n") + 1
            with self.routing.open("r+b") as f:
                f.truncate(keep)
            print(f"notice: dropped a partly written last line of {self.routing}; its sample runs again",
                  file=sys.stderr)
            if keep == 0:
                return []
        return read_routing(self.routing)

    def check_order(self, lines: Sequence[Mapping[str, Any]], expected: Sequence[tuple[str, str]]) -> None:
        """The written lines must be the first samples of the evaluation order, as (task, id) pairs."""
        if len(lines) > len(expected):
            raise EvalResumeError(f"{self.routing} holds {len(lines)} samples but this evaluation has "
                                  f"{len(expected)}; the task's data changed, so use another output_dir")
        for j, (line, (task, sample_id)) in enumerate(zip(lines, expected)):
            if (line["task"], line["id"]) != (task, sample_id):
                raise EvalResumeError(f"{self.routing}:{j + 1} is sample {line['id']!r} of {line['task']!r} but "
                                      f"this evaluation expects {sample_id!r} of {task!r} there; the task's data "
                                      "changed, so use another output_dir")

    def read(self) -> list[dict[str, Any]]:
        """Every line written so far (the whole evaluation once it has finished)."""
        return read_routing(self.routing)

    def append(self, records: Sequence[SampleRecord]) -> None:
        """Append finished samples with one write, then flush and fsync (they survive a kill right after)."""
        if not records:
            return
        text = "".join(json.dumps(routing_line(r), ensure_ascii=False) + "\n" for r in records)
        with self.routing.open("a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
