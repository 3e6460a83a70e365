"""RULER-style synthetic evaluation: a grid of (task, length in tokens) cells, n seeded samples each.

Examples come from `flux.data.synthetic.make_examples` (the generators shared with training); this module only
decides the grid, the generation budget and the scoring. As in RULER, a cell of length L means the whole sequence
fits in L tokens: the user message is generated at L minus the generation budget, minus the chat template's own
tokens, minus a 1% margin for the generators' overshoot, so the 8k cell runs on an 8k-context model. Scoring is RULER's `string_match_all`: the fraction of the
references found in the output, case-insensitive (RULER uses `string_match_part` only for its QA tasks, which the
flux generators do not include; for single-answer tasks the two coincide).

Each retrieval sample whose answers sit verbatim in its context also records where they sit (`needle_position`):
routing.jsonl carries it, so a figure can ask whether the router routes a prompt whose answer lies within the sparse
window differently from one whose answer is far from the question.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from flux.data.tokens import count_tokens
from flux.errors import ConfigError
from flux.evals.base import EvalSample, EvalTask, as_str_list, check_override
from flux.evals.metrics import string_match_all

# Generation budgets: RULER's values for its task families (niah 128, variable tracking 30, cwe 120, fwe 50, qa 32),
# and for the flux-only tasks enough for their answer (a UUID; one number or word).
RULER_MAX_NEW_TOKENS: dict[str, int] = {
    "niah_single": 128,
    "niah_multikey": 128,
    "niah_multivalue": 128,
    "niah_multiquery": 128,
    "kv_lookup": 64,
    "variable_tracking": 30,
    "cwe": 120,
    "fwe": 50,
    "continuation": 32,
    "summary_like": 32,
}
# The RULER-style suite of the evaluation issue: needles (single, multi-key, multi-value, multi-query), variable
# tracking, common- and frequent-word extraction.
DEFAULT_TASKS: tuple[str, ...] = (
    "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking", "cwe", "fwe",
)
DEFAULT_LENGTHS: tuple[int, ...] = (1024, 2048, 4096, 8192)
# The generators meet a token target to within about half a percent (cwe overshoots most, ~+0.6% at 8k with
# SmolLM2's tokenizer); 1% of the cell is kept free so that no prompt has to be truncated to fit.
LENGTH_MARGIN = 0.01


class RulerTask(EvalTask):
    """The RULER grid: `tasks` x `lengths` (tokens of the backbone's tokenizer), `n` samples per cell."""

    family = "ruler"

    def __init__(self, tasks: Sequence[str] | str = DEFAULT_TASKS, lengths: Sequence[int] = DEFAULT_LENGTHS,
                 n: int = 20, seed: int = 0, haystack: str = "noise", max_new_tokens: int | None = None) -> None:
        # Imported here so that importing flux.evals stays light; the generators pull in the haystack corpus.
        from flux.data.haystack import HAYSTACK_KINDS
        from flux.data.synthetic import MIN_LENGTH_TOKENS, TASKS

        self.tasks = as_str_list(tasks, "ruler tasks")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ConfigError(f"unknown ruler task(s) {unknown}; known: {sorted(TASKS)}")
        self.lengths = list(lengths)
        if not self.lengths or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in self.lengths):
            raise ConfigError(f"ruler lengths must be a non-empty list of positive token counts, got {lengths!r}")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"ruler n (samples per task and length) must be a positive integer, got {n!r}")
        if haystack not in HAYSTACK_KINDS:
            raise ConfigError(f"ruler haystack must be one of {HAYSTACK_KINDS}, got {haystack!r}")
        self.n, self.seed, self.haystack = n, seed, haystack
        self.override = check_override(max_new_tokens)
        unbudgeted = [t for t in self.tasks if t not in RULER_MAX_NEW_TOKENS]
        if self.override is None and unbudgeted:
            raise ConfigError(f"no default generation budget for ruler task(s) {unbudgeted}; "
                             "set max_new_tokens=N in the eval config")
        # The template's tokens are only known with the tokenizer (see samples); the budget is known now.
        too_short = [(t, L) for t in self.tasks for L in self.lengths if L - self._budget(t) < MIN_LENGTH_TOKENS]
        if too_short:
            raise ConfigError(f"ruler (task, length) cells {too_short} leave fewer than {MIN_LENGTH_TOKENS} tokens "
                             "for the prompt after the generation budget; use longer lengths")

    def samples(self, tokenizer: Any = None, prompt_overhead: int | None = None) -> list[EvalSample]:
        """Generate the grid. `prompt_overhead` is the number of tokens the prompt adds around the user message
        (chat template, BOS); by default it is measured with `flux.data.prompting.build_prompt`."""
        if tokenizer is None:
            raise ValueError("ruler needs the backbone's tokenizer: its lengths are counted in tokens")
        from flux.data.haystack import Haystack
        from flux.data.synthetic import MIN_LENGTH_TOKENS, make_examples

        overhead = template_overhead(tokenizer) if prompt_overhead is None else prompt_overhead
        # One haystack for the whole grid: it caches the token count of every filler sentence.
        haystack = Haystack(self.haystack, tokenizer)
        out: list[EvalSample] = []
        cells = [(task, length) for task in self.tasks for length in self.lengths]
        for task, length in tqdm(cells, desc="ruler: generating", unit="cell"):
            message_tokens = length - self._budget(task) - overhead - int(LENGTH_MARGIN * length)
            if message_tokens < MIN_LENGTH_TOKENS:
                raise ConfigError(f"ruler length {length} leaves {message_tokens} tokens for {task!r} after its "
                                 f"{self._budget(task)} generated tokens, {overhead} template tokens and the 1% "
                                 "margin; use longer lengths")
            for ex in make_examples(task, self.n, message_tokens, tokenizer, self.seed, haystack):
                position = needle_position(ex.context, ex.answers, tokenizer) if ex.task_type == "retrieval" else {}
                out.append(EvalSample(
                    id=ex.id,
                    task=task,
                    context=ex.context,
                    question=ex.question,
                    answers=tuple(ex.answers),
                    length_hint=length,
                    meta={"task_type": ex.task_type, "message_tokens": message_tokens, **ex.meta, **position},
                ))
        return out

    def _budget(self, task: str) -> int:
        return self.override if self.override is not None else RULER_MAX_NEW_TOKENS[task]

    def score(self, prediction: str, sample: EvalSample) -> float:
        return string_match_all(prediction, sample.answers)

    def max_new_tokens(self, sample: EvalSample) -> int:
        return self._budget(sample.task)

    def row_key(self, sample: EvalSample) -> tuple[str, int]:
        return f"{self.family}/{sample.task}", sample.length_hint

    def required_positions(self) -> int:
        """The longest cell: prompt and generation are sized to fit in it."""
        return max(self.lengths)


def needle_position(context: str, answers: Sequence[str], tokenizer: Any) -> dict[str, Any]:
    """Where the answers of a retrieval sample sit: `needle_distance_tokens`, the context tokens from the farthest
    answer the question needs (the first occurrence of the earliest one) to the end of the context, where the
    question starts; and `needle_depth`, the share of the context's tokens before it (0 = at the start). Empty when
    an answer is not in the context verbatim (then there is no single place to point at)."""
    starts = [context.find(answer) for answer in answers]
    if not answers or min(starts) < 0:
        return {}
    distance = count_tokens(tokenizer, context[min(starts):])
    total = max(count_tokens(tokenizer, context), distance)  # split text may tokenise one token longer
    return {"needle_distance_tokens": distance, "needle_depth": round(1.0 - distance / total, 4)}


def template_overhead(tokenizer: Any) -> int:
    """Tokens a generation prompt adds around its user message (chat template or plain layout, BOS)."""
    from flux.data.prompting import build_prompt

    probe = "x"
    return len(build_prompt(tokenizer, "", probe).input_ids) - len(tokenizer(probe, add_special_tokens=False)["input_ids"])
