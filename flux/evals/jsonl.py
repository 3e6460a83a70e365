"""User-provided long-context QA in JSONL: `{"context", "question", "answers", "id"?, "task"?}` per line.

The prompt is the context, a blank line, then the question (the default template); a sample scores 1 when any
answer occurs in the output, case-insensitive, and scores are averaged per `task` (the file name when absent).
The file is read and checked when the task is built, so a bad line fails before any model work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flux.errors import ConfigError
from flux.evals.base import TASK_TYPES, EvalDataError, EvalSample, EvalTask, check_override
from flux.evals.io import field_str, field_str_list, optional_id, read_jsonl
from flux.evals.metrics import string_match_part

DEFAULT_MAX_NEW_TOKENS = 64


def load_jsonl_samples(path: str | Path, task_type: str = "retrieval") -> list[EvalSample]:
    """Parse and validate a user JSONL file (errors name `file:line` and the offending field)."""
    default_task = Path(path).stem
    samples: list[EvalSample] = []
    seen: dict[str, str] = {}
    for i, (loc, rec) in enumerate(read_jsonl(path, "eval.task.path")):
        sample_id = optional_id(rec, "id", loc, default=f"{default_task}-{i}")
        if sample_id in seen:
            raise EvalDataError(f"{loc}: duplicate id {sample_id!r} (first at {seen[sample_id]}); ids must be unique")
        seen[sample_id] = loc
        task = rec.get("task", default_task)
        if not isinstance(task, str) or not task:
            raise EvalDataError(f"{loc}: field 'task' must be a non-empty string, got {task!r}")
        context = field_str(rec, "context", loc)
        samples.append(EvalSample(
            id=sample_id,
            task=task,
            context=context,
            question=field_str(rec, "question", loc, allow_empty=False),
            answers=field_str_list(rec, "answers", loc),
            length_hint=len(context),
            meta={"task_type": task_type, "source": loc},
        ))
    return samples


class JsonlTask(EvalTask):
    """Any-answer-contained scoring over a user JSONL file; one results row per `task`."""

    family = "jsonl"

    def __init__(self, path: str, max_new_tokens: int | None = None, task_type: str = "retrieval") -> None:
        if task_type not in TASK_TYPES:
            raise ConfigError(f"jsonl task_type must be one of {TASK_TYPES}, got {task_type!r}")
        self.budget = check_override(max_new_tokens) or DEFAULT_MAX_NEW_TOKENS
        self._samples = load_jsonl_samples(path, task_type)

    def samples(self, tokenizer: Any = None) -> list[EvalSample]:
        return list(self._samples)

    def score(self, prediction: str, sample: EvalSample) -> float:
        return string_match_part(prediction, sample.answers)

    def max_new_tokens(self, sample: EvalSample) -> int:
        return self.budget

    def row_key(self, sample: EvalSample) -> tuple[str, int]:
        return f"{self.family}/{sample.task}", 0
