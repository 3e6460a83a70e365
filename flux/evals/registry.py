"""Name -> task factory, the one place `flux.evaluate` (and Hydra configs) turn `eval=<name>` into a task object."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from flux.errors import ConfigError
from flux.evals.base import EvalTask
from flux.evals.jsonl import JsonlTask
from flux.evals.longbench import LongBenchTask
from flux.evals.longbench_v2 import LongBenchV2Task
from flux.evals.math_tasks import MathTask
from flux.evals.ppl import PerplexityTask
from flux.evals.ruler import RulerTask


class UnknownEvalTaskError(ConfigError, KeyError):
    """An eval task name that is not registered."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


def longbench(path: str, datasets: Sequence[str] | None = None, max_new_tokens: int | None = None) -> LongBenchTask:
    """LongBench: all 21 datasets (or `datasets`), one results row per dataset."""
    return LongBenchTask(path, datasets, max_new_tokens, variant="longbench")


def longbench_e(path: str, datasets: Sequence[str] | None = None, max_new_tokens: int | None = None) -> LongBenchTask:
    """LongBench-E: the 13 length-balanced datasets, one row per dataset and length bucket."""
    return LongBenchTask(path, datasets, max_new_tokens, variant="longbench_e")


EVAL_TASKS: dict[str, Callable[..., EvalTask | PerplexityTask]] = {
    "ruler": RulerTask,
    "jsonl": JsonlTask,
    "longbench": longbench,
    "longbench_e": longbench_e,
    "longbench_v2": LongBenchV2Task,
    "math": MathTask,
    "ppl": PerplexityTask,
}


def get_eval_task(name: str, **cfg: Any) -> EvalTask | PerplexityTask:
    """Build the task `name` from its options; unknown names and options fail with the valid choices listed.

    Every task is an `EvalTask` (generate, then score) except `ppl`, a `PerplexityTask` (score token NLLs).
    File-backed tasks read and validate their files here, before any model work.
    """
    if name not in EVAL_TASKS:
        raise UnknownEvalTaskError(f"unknown eval task {name!r}; known tasks: {sorted(EVAL_TASKS)}")
    factory = EVAL_TASKS[name]
    params = inspect.signature(factory).parameters
    unknown = sorted(set(cfg) - set(params))
    if unknown:
        raise ConfigError(f"eval task {name!r} got unknown option(s) {unknown}; its options are {list(params)}")
    missing = [p for p, spec in params.items() if spec.default is inspect.Parameter.empty and p not in cfg]
    if missing:
        raise ConfigError(f"eval task {name!r} needs option(s) {missing} (e.g. eval.task.{missing[0]}=...)")
    return factory(**cfg)
