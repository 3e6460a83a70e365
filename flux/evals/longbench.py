"""LongBench and LongBench-E from local copies of the official JSONL files.

Records carry `input, context, answers, length, dataset, language, all_classes, _id`. `path` is either the
official data folder (one `<dataset>.jsonl`, or `<dataset>_e.jsonl` for LongBench-E, per dataset) or a single
JSONL file whose records name their `dataset`. Prompts, budgets and metrics come from `longbench_spec`; scores
are the official ones in [0, 1] (best over the references). LongBench rows are one per dataset; LongBench-E rows
are one per dataset and length bucket (0-4k, 4-8k, 8k+ words), keyed by the bucket's lower bound.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from flux.errors import ConfigError, UserFileNotFoundError
from flux.evals import metrics
from flux.evals.base import EvalDataError, EvalSample, EvalTask, as_str_list, check_override
from flux.evals.io import field_str, field_str_list, optional_id, read_jsonl
from flux.evals.longbench_spec import LONGBENCH_DATASETS, LONGBENCH_E_DATASETS, length_bucket

Metric = Callable[[str, str, EvalSample], float]

METRICS: dict[str, Metric] = {
    "qa_f1": lambda pred, ref, s: metrics.qa_f1(pred, ref),
    "qa_f1_zh": lambda pred, ref, s: metrics.qa_f1_zh(pred, ref),
    "rouge": lambda pred, ref, s: metrics.rouge_l(pred, ref),
    "rouge_zh": lambda pred, ref, s: metrics.rouge_l_zh(pred, ref),
    "classification": lambda pred, ref, s: metrics.classification_score(pred, ref, s.meta["all_classes"]),
    "retrieval": lambda pred, ref, s: metrics.retrieval_score(pred, ref, "en"),
    "retrieval_zh": lambda pred, ref, s: metrics.retrieval_score(pred, ref, "zh"),
    "count": lambda pred, ref, s: metrics.count_score(pred, ref),
    "code_sim": lambda pred, ref, s: metrics.code_sim_score(pred, ref),
}


def canonical_dataset(name: str, loc: str) -> str:
    """Official dataset name; LongBench-E files spell names with an `_e` suffix (`qasper_e`)."""
    base = name[:-2] if name.endswith("_e") and name[:-2] in LONGBENCH_DATASETS else name
    if base not in LONGBENCH_DATASETS:
        raise EvalDataError(f"{loc}: unknown LongBench dataset {name!r}; known: {sorted(LONGBENCH_DATASETS)}")
    return base


def _all_classes(rec: dict[str, Any], dataset: str, loc: str) -> tuple[str, ...]:
    classes = rec.get("all_classes")
    if LONGBENCH_DATASETS[dataset].metric != "classification":
        return ()
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise EvalDataError(f"{loc}: {dataset} is scored by classification and needs 'all_classes' "
                            f"(a non-empty list of class names), got {classes!r:.80}")
    return tuple(classes)


def parse_record(rec: dict[str, Any], loc: str, dataset: str | None = None) -> EvalSample:
    """One official LongBench record as an EvalSample; `dataset` overrides the record's field (folder layout)."""
    if dataset is None:
        dataset = canonical_dataset(field_str(rec, "dataset", loc), loc)
    spec = LONGBENCH_DATASETS[dataset]
    length = rec.get("length")
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise EvalDataError(f"{loc}: field 'length' must be a non-negative integer word count, got {length!r}")
    return EvalSample(
        id=optional_id(rec, "_id", loc, default=loc),
        task=dataset,
        context=field_str(rec, "context", loc),
        # Summarisation datasets have an empty `input`; the field must still be present.
        question=field_str(rec, "input", loc),
        answers=field_str_list(rec, "answers", loc),
        length_hint=length,
        meta={"task_type": spec.task_type, "dataset": dataset, "category": spec.category,
              "all_classes": _all_classes(rec, dataset, loc), "language": rec.get("language", spec.language)},
        template=spec.template,
        chat=spec.chat,
    )


def load_longbench(path: str | Path, datasets: Sequence[str] | None, variant: str) -> list[EvalSample]:
    """Read LongBench (`variant="longbench"`) or LongBench-E (`"longbench_e"`) samples from a folder or file."""
    official = list(LONGBENCH_E_DATASETS if variant == "longbench_e" else LONGBENCH_DATASETS)
    wanted = official if datasets is None else as_str_list(datasets, f"{variant} datasets")
    unknown = [d for d in wanted if d not in official]
    if unknown:
        raise ConfigError(f"unknown {variant} dataset(s) {unknown}; choose from {official}")
    root = Path(path).expanduser()
    if root.is_dir():
        suffix = "_e.jsonl" if variant == "longbench_e" else ".jsonl"
        missing = [d + suffix for d in wanted if not (root / (d + suffix)).is_file()]
        if missing:
            raise UserFileNotFoundError(f"{variant}: {root} lacks {missing}; put the official files there or pass "
                                    f"eval.task.datasets=[...] with the datasets you have")
        return [parse_record(rec, loc, d) for d in tqdm(wanted, desc=f"{variant}: loading", unit="dataset")
                for loc, rec in read_jsonl(root / (d + suffix), "eval.task.path")]
    samples = [parse_record(rec, loc) for loc, rec in read_jsonl(root, "eval.task.path")]
    outside = sorted({s.task for s in samples} - set(official))
    if datasets is None and outside:
        raise EvalDataError(f"{root}: holds {outside}, which are not part of {variant}; pass "
                            f"eval.task.datasets=[...] to pick datasets from the file")
    return [s for s in samples if s.task in wanted]


class LongBenchTask(EvalTask):
    """LongBench (one row per dataset) or LongBench-E (one row per dataset and length bucket)."""

    def __init__(self, path: str, datasets: Sequence[str] | None = None, max_new_tokens: int | None = None,
                 variant: str = "longbench") -> None:
        if variant not in ("longbench", "longbench_e"):
            raise ConfigError(f"LongBench variant must be 'longbench' or 'longbench_e', got {variant!r}")
        self.family = variant
        self.override = check_override(max_new_tokens)
        self._samples = load_longbench(path, datasets, variant)
        if not self._samples:
            raise EvalDataError(f"{path}: no records of the requested {variant} datasets {datasets}")

    def samples(self, tokenizer: Any = None) -> list[EvalSample]:
        return list(self._samples)

    def score(self, prediction: str, sample: EvalSample) -> float:
        spec = LONGBENCH_DATASETS[sample.task]
        if spec.first_line:
            prediction = prediction.lstrip("\n").split("\n")[0]
        metric = METRICS[spec.metric]
        return max(metric(prediction, ref, sample) for ref in sample.answers)

    def max_new_tokens(self, sample: EvalSample) -> int:
        return self.override if self.override is not None else LONGBENCH_DATASETS[sample.task].max_new_tokens

    def row_key(self, sample: EvalSample) -> tuple[str, int]:
        bucket = length_bucket(sample.length_hint) if self.family == "longbench_e" else 0
        return f"{self.family}/{sample.task}", bucket
