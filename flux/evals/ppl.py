"""Perplexity on local text: a `.txt` file, or a `.jsonl` file of `{"text": ...}` records (joined by blank lines).

The text is tokenised once (no special tokens) and cut into windows of `window` tokens that advance by `stride`
tokens. With `stride < window` each window re-reads the end of the previous one as context and scores only the
tokens that are new (the usual sliding-window perplexity); with `stride == window` (the default, fastest) windows
are disjoint and the first token of each window, having no history inside it, is not scored. The model side sums token NLLs; `result_row` turns the sums into a results row whose
score is the inverse perplexity exp(-mean NLL), which lies in [0, 1] like every other score.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flux.errors import ConfigError
from flux.evals.base import EvalDataError
from flux.evals.io import existing_file, field_str, read_jsonl, read_text
from flux.evals.results import SampleRecord


@dataclass(frozen=True)
class PplWindow:
    """Token ids of one window; positions t >= max(score_from, 1) are scored as predictions of input_ids[t]."""

    id: str
    input_ids: list[int]
    score_from: int

    @property
    def n_scored(self) -> int:
        return len(self.input_ids) - max(self.score_from, 1)


def load_text(path: str | Path) -> str:
    p = existing_file(path, "eval.task.path")
    if p.suffix == ".jsonl":
        return "\n\n".join(field_str(rec, "text", loc) for loc, rec in read_jsonl(p, "eval.task.path"))
    return read_text(p, "eval.task.path")


def make_windows(ids: Sequence[int], window: int, stride: int, prefix: str) -> list[PplWindow]:
    """Sliding windows over `ids` that score at least one token each; no token is scored twice (see the module
    docstring for which tokens are not scored)."""
    windows: list[PplWindow] = []
    scored_until = 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        candidate = PplWindow(f"{prefix}-{len(windows)}", list(ids[begin:end]), scored_until - begin)
        if candidate.n_scored > 0:  # a trailing one-token window has nothing to predict
            windows.append(candidate)
        scored_until = end
        if end == len(ids):
            break
    return windows


class PerplexityTask:
    """Sliding-window perplexity over one text file (no generation, so not an EvalTask)."""

    family = "ppl"

    def __init__(self, path: str, window: int = 2048, stride: int | None = None, label: str | None = None) -> None:
        if not isinstance(window, int) or window < 2:
            raise ConfigError(f"ppl window must be an integer >= 2 tokens, got {window!r}")
        stride = window if stride is None else stride
        if not isinstance(stride, int) or not 1 <= stride <= window:
            raise ConfigError(f"ppl stride must be an integer in [1, window={window}], got {stride!r}")
        self.path, self.window, self.stride = Path(path), window, stride
        self.label = label or self.path.stem
        self.text = load_text(path)
        if not self.text.strip():
            raise EvalDataError(f"{path}: no text to compute perplexity on")

    def windows(self, tokenizer: Any) -> list[PplWindow]:
        ids = tokenizer(self.text, add_special_tokens=False)["input_ids"]
        if len(ids) < 2:
            raise EvalDataError(f"{self.path}: only {len(ids)} token(s); perplexity needs at least 2")
        return make_windows(ids, self.window, self.stride, self.label)

    def required_positions(self) -> int:
        return self.window

    def row_key(self) -> tuple[str, int]:
        return f"{self.family}/{self.label}", self.window

    def record(self, window: PplWindow, nll_sum: float, decisions: Sequence[bool],
               gates: Sequence[float] | None = None) -> SampleRecord:
        """The routing.jsonl record of one window; its score is the window's inverse perplexity."""
        task, length = self.row_key()
        return SampleRecord(id=window.id, task=task, task_type="holistic", length=length,
                            score=math.exp(-nll_sum / window.n_scored), decisions=decisions,
                            prompt_tokens=len(window.input_ids), gates=gates)

    def result_row(self, nll_sums: Sequence[float], token_counts: Sequence[int],
                   decisions: Sequence[Sequence[bool]]) -> dict[str, Any]:
        """The results row of a pass over all windows: score = exp(-total NLL / total scored tokens)."""
        if not (len(nll_sums) == len(token_counts) == len(decisions)) or not nll_sums:
            raise ValueError(f"need one NLL sum, token count and decision list per window, got "
                             f"{len(nll_sums)}, {len(token_counts)}, {len(decisions)}")
        total_tokens = sum(token_counts)
        if total_tokens <= 0:
            raise ValueError("no scored tokens: token_counts sum to 0")
        task, length = self.row_key()
        return {"task": task, "length": length, "n": len(nll_sums),
                "score": math.exp(-sum(nll_sums) / total_tokens),
                "sparsity": sum(sum(map(bool, d)) / len(d) for d in decisions) / len(decisions)}


def perplexity(score: float) -> float:
    """Perplexity from a ppl results-row score (its inverse)."""
    return math.inf if score == 0 else 1.0 / score
