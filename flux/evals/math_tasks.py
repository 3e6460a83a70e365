"""Math word problems from local JSONL files in the GSM8K, MATH-500 and AIME formats.

Formats (one JSON object a line):
  gsm8k:   {"question", "answer"}  where `answer` is the worked solution ending in "#### N"
  math500: {"problem", "solution", "answer"}  (`answer` is the LaTeX final answer)
  aime:    {"problem", "answer"}  (`answer` an integer 0-999, as number or string)
`format="auto"` picks the format from the first record's fields. These prompts have no long context: the context
slot is empty and the whole problem is the question, followed by the usual step-by-step / `\\boxed{}` instruction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flux.errors import ConfigError
from flux.evals.base import EvalDataError, EvalSample, EvalTask, check_override
from flux.evals.io import field_str, optional_id, read_jsonl
from flux.evals.math_metrics import gsm8k_reference, math_score

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
TEMPLATE = "{context}{question}\n" + INSTRUCTION
MATH_FORMATS: dict[str, int] = {"gsm8k": 512, "math500": 1024, "aime": 2048}  # format -> default max_new_tokens
_PROBLEM_FIELD = {"gsm8k": "question", "math500": "problem", "aime": "problem"}


def detect_format(record: dict[str, Any], loc: str) -> str:
    if "question" in record and isinstance(record.get("answer"), str) and "####" in record["answer"]:
        return "gsm8k"
    if "problem" in record and "solution" in record and "answer" in record:
        return "math500"
    if "problem" in record and "answer" in record:
        return "aime"
    raise EvalDataError(f"{loc}: cannot tell the math format from fields {sorted(record)}; expected gsm8k "
                        "{question, answer with '#### N'}, math500 {problem, solution, answer} or aime "
                        "{problem, answer}; or set eval.task.format")


def _reference(rec: dict[str, Any], fmt: str, loc: str) -> str:
    if fmt == "gsm8k":
        try:
            return gsm8k_reference(field_str(rec, "answer", loc))
        except ValueError as err:
            raise EvalDataError(f"{loc}: {err}") from err
    value = rec.get("answer")
    if fmt == "aime" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return field_str(rec, "answer", loc, allow_empty=False)


def load_math(path: str | Path, fmt: str = "auto") -> tuple[str, list[EvalSample]]:
    """(format, samples) of a math JSONL file."""
    if fmt != "auto" and fmt not in MATH_FORMATS:
        raise ConfigError(f"math format must be 'auto' or one of {list(MATH_FORMATS)}, got {fmt!r}")
    samples: list[EvalSample] = []
    for i, (loc, rec) in enumerate(read_jsonl(path, "eval.task.path")):
        if fmt == "auto":
            fmt = detect_format(rec, loc)
        samples.append(EvalSample(
            id=optional_id(rec, "id", loc, default=optional_id(rec, "unique_id", loc, default=f"{fmt}-{i}")),
            task=fmt,
            context="",
            question=field_str(rec, _PROBLEM_FIELD[fmt], loc, allow_empty=False),
            answers=(_reference(rec, fmt, loc),),
            length_hint=0,
            meta={"task_type": "holistic", "format": fmt},
            template=TEMPLATE,
        ))
    return fmt, samples


class MathTask(EvalTask):
    """Final-answer accuracy; one results row `math/<label>` (the format name unless `label` is given)."""

    family = "math"

    def __init__(self, path: str, format: str = "auto", label: str | None = None,
                 max_new_tokens: int | None = None) -> None:
        self.format, self._samples = load_math(path, format)
        self.label = label or self.format
        self.budget = check_override(max_new_tokens) or MATH_FORMATS[self.format]

    def samples(self, tokenizer: Any = None) -> list[EvalSample]:
        return list(self._samples)

    def score(self, prediction: str, sample: EvalSample) -> float:
        return math_score(prediction, sample.answers[0])

    def max_new_tokens(self, sample: EvalSample) -> int:
        return self.budget

    def row_key(self, sample: EvalSample) -> tuple[str, int]:
        return f"{self.family}/{self.label}", 0
