"""The common currency of the evaluation harness: one sample type and one task interface for every benchmark.

Every loader (RULER, user JSONL, LongBench, LongBench-E, LongBench-v2, math) turns its own file format into
`EvalSample`s, and every task object answers the same four questions the entry point asks: which samples, how to
score a generation, how many tokens to generate, and which results row a sample belongs to. Keeping benchmark
specifics behind this interface is what lets `flux.evaluate` stay one loop for all of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from flux.errors import ConfigError, FluxUserError

CONTEXT_SLOT = "{context}"
QUESTION_SLOT = "{question}"
DEFAULT_TEMPLATE = CONTEXT_SLOT + "\n\n" + QUESTION_SLOT
# The two kinds of task routing.jsonl distinguishes (the paper sets separate sparsity targets for them).
TASK_TYPES: tuple[str, ...] = ("retrieval", "holistic")


class EvalDataError(FluxUserError):
    """A data file or record the user pointed at cannot be used (bad JSON, missing field, wrong type)."""


class PromptFields(NamedTuple):
    """The arguments `flux.data.prompting.build_prompt` takes for a sample's user message.

    The message is `context + separator + question`; `build_prompt` cuts tokens from the middle of `context` when
    the prompt is over its budget and marks the context and question spans for the router. Benchmark templates put
    their opening instructions in front of the context (they survive middle truncation) and everything after the
    context, the question included, into `question`.
    """

    context: str
    question: str
    separator: str


@dataclass(frozen=True)
class EvalSample:
    """One evaluation example, independent of the benchmark it came from.

    `template` holds the benchmark's prompt with one `{context}` slot and at most one `{question}` slot after it;
    `chat` says whether the official protocol wraps the prompt in the model's chat template (LongBench's few-shot
    and code datasets are fed raw). `length_hint` is the context size in the unit the source reports (tokens for
    RULER, words for LongBench, characters otherwise); it is only meant for ordering samples into batches.
    `meta["task_type"]` is always set, to `retrieval` or `holistic` (the two task kinds of routing.jsonl).
    """

    id: str
    task: str
    context: str
    question: str
    answers: tuple[str, ...]
    length_hint: int
    meta: Mapping[str, Any] = field(default_factory=dict)
    template: str = DEFAULT_TEMPLATE
    chat: bool = True

    def __post_init__(self) -> None:
        if self.template.count(CONTEXT_SLOT) != 1:
            raise EvalDataError(f"sample {self.id!r}: template must contain {CONTEXT_SLOT} exactly once: "
                                f"{self.template!r}")
        q_at = self.template.find(QUESTION_SLOT)
        if self.template.count(QUESTION_SLOT) > 1 or (0 <= q_at < self.template.find(CONTEXT_SLOT)):
            raise EvalDataError(
                f"sample {self.id!r}: template may contain {QUESTION_SLOT} at most once, after {CONTEXT_SLOT}: "
                f"{self.template!r}"
            )

    def prompt_fields(self) -> PromptFields:
        """Context, question and separator for `build_prompt(tokenizer, *fields[:2], separator=fields.separator)`."""
        if self.template == DEFAULT_TEMPLATE:
            # Same layout as the training prompts: the context and question spans are exactly the two texts.
            return PromptFields(self.context, self.question, "\n\n")
        prefix, rest = self.template.split(CONTEXT_SLOT)
        # str.replace (not str.format) because contexts and questions are arbitrary text with braces in them.
        return PromptFields(prefix + self.context, rest.replace(QUESTION_SLOT, self.question), "")

    def render(self) -> str:
        """The full user message, untruncated and before any chat template (for logs and W&B tables)."""
        fields = self.prompt_fields()
        return fields.context + fields.separator + fields.question


class EvalTask(ABC):
    """A generation benchmark: samples, scoring, generation budget, and the results row each sample lands in.

    Result rows are keyed by `(task, length)`. Task labels are `family/name` (e.g. `ruler/niah_single`,
    `longbench_e/qasper`, `math/gsm8k`) so that the tables script can tell benchmark families apart from
    `results.json` alone.
    """

    family: str

    @abstractmethod
    def samples(self, tokenizer: Any = None) -> list[EvalSample]:
        """Load or generate the samples. Only RULER needs the tokenizer (its lengths are in tokens)."""

    @abstractmethod
    def score(self, prediction: str, sample: EvalSample) -> float:
        """Score one decoded generation (the new tokens only, special tokens removed) in [0, 1]."""

    @abstractmethod
    def max_new_tokens(self, sample: EvalSample) -> int:
        """Greedy-decoding budget for this sample (the benchmark's official value unless overridden)."""

    @abstractmethod
    def row_key(self, sample: EvalSample) -> tuple[str, int]:
        """(task label, length) of the results row this sample is averaged into."""

    def required_positions(self) -> int | None:
        """Positions the model must support, or None when prompts are middle-truncated to fit any model.

        Only tasks with lengths fixed by the user (RULER) return a number; the entry point compares it with the
        backbone's maximum before any model work so an impossible length fails early with a clear message.
        """
        return None


def check_override(max_new_tokens: int | None) -> int | None:
    """Validate a user override of the generation budget (None keeps the per-task official values)."""
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
        raise ConfigError(f"max_new_tokens must be a positive integer or null, got {max_new_tokens!r}")
    return max_new_tokens


def as_str_list(value: Sequence[str] | str, what: str) -> list[str]:
    """Accept one name or a list of names from a config, reject anything else with a message naming `what`."""
    if isinstance(value, str):
        return [value]
    items = list(value)
    if not items or not all(isinstance(v, str) and v for v in items):
        raise ConfigError(f"{what} must be a non-empty list of names, got {value!r}")
    return items
