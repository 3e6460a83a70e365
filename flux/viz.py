"""Figures for routing maps, quality-sparsity trade-offs, speed and training curves.

Everything here reads the files flux writes (``routing.jsonl``, ``results.json``, ``bench.json``, Lightning's
``metrics.csv``) and returns a :class:`matplotlib.figure.Figure`. Figures are built with the object API and never
through ``pyplot``, so nothing depends on the active backend (Agg on servers, inline in notebooks, W&B's callback)
and no global figure registry grows during a long training run. The same functions serve the notebooks and the
W&B routing-map callback, so a figure looks the same in both places.

Files are read and checked through :mod:`flux.evals.results`, the one schema for results, routing and bench files,
so what flux.evaluate writes and what a figure accepts cannot drift apart. Bad input raises one message that names
the file and the fix: a schema error (:class:`~flux.evals.results.ResultsFormatError`; :class:`VizInputError`, a
subclass, for what only a figure can judge, such as the wrong layer count) or :class:`VizFileNotFoundError`.
Notebooks catch :data:`INPUT_ERRORS` to print that message instead of a matplotlib traceback.
"""

from __future__ import annotations

import csv
import functools
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import matplotlib
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from flux.errors import UserFileNotFoundError
from flux.evals.base import EvalDataError
from flux.evals.results import (
    BENCH_FILE,
    BENCH_PHASES,
    RESULTS_FILE,
    ROUTING_FILE,
    ROUTING_META_KEYS,
    ResultsFormatError,
    check_routing_record,
    read_bench,
    read_results,
    read_routing,
    validate_bench,
    validate_results,
)

__all__ = [
    "FA_COLOR",
    "INPUT_ERRORS",
    "PARETO_RING",
    "SA_COLOR",
    "RoutingRecord",
    "RunFiles",
    "VizFileNotFoundError",
    "VizInputError",
    "as_records",
    "context_awareness",
    "find_run_files",
    "layer_fa_probability",
    "length_buckets",
    "load_bench",
    "load_metrics",
    "load_results",
    "load_routing",
    "pareto_front",
    "per_input_stats",
    "quality_vs_sparsity",
    "routing_heatmap",
    "save_figure",
    "sparsity_distribution",
    "speedup_vs_length",
    "task_colors",
    "training_curves",
]


class VizInputError(ResultsFormatError):
    """An input file or record that cannot be plotted; the message names it and says how to fix it."""


class VizFileNotFoundError(UserFileNotFoundError):
    """An expected output file is missing; the message says which command writes it."""


# What a notebook catches to print one line instead of a traceback: flux's file schema errors (VizInputError is one),
# unreadable files, and missing ones.
INPUT_ERRORS: tuple[type[Exception], ...] = (ResultsFormatError, EvalDataError, VizFileNotFoundError)

# Fixed colours so a reader can compare figures at a glance: FA is always blue, SA always orange.
FA_COLOR = "#2f5d8a"
SA_COLOR = "#f28e2b"
ROUTING_STYLES: dict[str, tuple[str, str]] = {
    "dense": ("#222222", "s"),
    "sparse": (SA_COLOR, "v"),
    "router": ("#d62728", "*"),
    "static": ("#2ca02c", "D"),
    "first_dense": ("#9467bd", "^"),
    "random": ("#8c8c8c", "o"),
}

_STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "figure.dpi": 100,
    "savefig.dpi": 150,
}

# gid of the rings around the Pareto-front points of quality_vs_sparsity (the other collections are the runs).
PARETO_RING = "pareto-front-points"

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _styled(draw: Callable[_P, _R]) -> Callable[_P, _R]:
    """Apply the shared style only while a figure is built, leaving the caller's rcParams untouched."""

    @functools.wraps(draw)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with matplotlib.rc_context(_STYLE):
            return draw(*args, **kwargs)

    return wrapper


# ---------------------------------------------------------------------------------------------------------------
# Routing records
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoutingRecord:
    """One evaluated sample: which layers ran sparse attention (``decisions``, 1 = SA) and the router's FA gates."""

    id: str
    task: str
    task_type: str
    length: int
    decisions: tuple[int, ...]
    gates: tuple[float, ...] | None
    score: float | None
    meta: Mapping[str, Any] = field(default_factory=dict)  # per-input properties (flux.evals.results)

    @property
    def num_layers(self) -> int:
        return len(self.decisions)

    @property
    def sparsity(self) -> float:
        """Fraction of layers routed to SA for this sample."""
        return sum(self.decisions) / len(self.decisions)

    def fa_probability(self) -> np.ndarray:
        """Per-layer probability of FA: the gates when the router logged them, else the hard decisions."""
        if self.gates is not None:
            return np.asarray(self.gates, dtype=float)
        return 1.0 - np.asarray(self.decisions, dtype=float)


def _parse_record(raw: object, where: str) -> RoutingRecord:
    """Check one routing record against the routing.jsonl schema (flux.evals.results); ``where`` names it."""
    check_routing_record(raw, where)
    return RoutingRecord(
        id=raw["id"],
        task=raw["task"],
        task_type=raw["task_type"],
        length=raw["length"],
        decisions=tuple(raw["decisions"]),
        gates=None if raw["gates"] is None else tuple(float(g) for g in raw["gates"]),
        score=None if raw["score"] is None else float(raw["score"]),
        meta=dict(raw.get("meta") or {}),
    )


def _check_layers(records: Sequence[RoutingRecord], source: str, num_layers: int | None) -> None:
    first = records[0].num_layers
    for i, record in enumerate(records):
        if record.num_layers != first:
            raise VizInputError(
                f"{source} record {i}: has {record.num_layers} layers but the first record has {first}; "
                "one routing file must come from one backbone: keep the records of a single run per file")
    if num_layers is not None and first != num_layers:
        raise VizInputError(
            f"{source}: records have {first} layers but num_layers={num_layers} was expected; pass the routing "
            "file of a run on this backbone, or num_layers=None to skip the check")


def as_records(records: Iterable[RoutingRecord | Mapping[str, Any]], num_layers: int | None = None,
               source: str = "routing records") -> list[RoutingRecord]:
    """Validate in-memory records (dicts in the routing.jsonl format, or RoutingRecords), e.g. from a callback."""
    parsed = [raw if isinstance(raw, RoutingRecord) else _parse_record(raw, f"{source} record {i}")
              for i, raw in enumerate(records)]
    if not parsed:
        raise VizInputError(f"{source}: no routing records; evaluate with a router plan so samples are logged")
    _check_layers(parsed, source, num_layers)
    return parsed


def _resolve(path_or_dir: str | Path, filename: str, made_by: str) -> Path:
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / filename
    if not path.is_file():
        raise VizFileNotFoundError(f"{path} not found; it is written by {made_by}: run that first, or pass "
                                   "the path of an existing file or of the folder holding it")
    return path


def load_routing(path_or_dir: str | Path, num_layers: int | None = None) -> list[RoutingRecord]:
    """Read ``routing.jsonl`` (a file, or a run folder holding one) through flux.evals.results.

    ``num_layers`` checks that the records come from a backbone with that many layers.
    """
    path = _resolve(path_or_dir, ROUTING_FILE, "`python -m flux.evaluate` (one line per evaluated sample)")
    records = [_parse_record(raw, f"{path} record {i}") for i, raw in enumerate(read_routing(path))]
    _check_layers(records, str(path), num_layers)
    return records


# ---------------------------------------------------------------------------------------------------------------
# results.json, bench.json, metrics.csv
# ---------------------------------------------------------------------------------------------------------------


def _source_of(data: object, default: str) -> str:
    """Where loaded data came from (loaders record it), for error messages about in-memory inputs."""
    return str(data.get("source", default)) if isinstance(data, Mapping) else default


def _checked_run(run: object, default_source: str) -> dict[str, Any]:
    """An in-memory run checked against the results.json schema; the loaders' ``source`` key is not part of it."""
    source = _source_of(run, default_source)
    body = {k: v for k, v in run.items() if k != "source"} if isinstance(run, Mapping) else run
    return validate_results(body, source) | {"source": source}


def load_results(path_or_dir: str | Path) -> list[dict[str, Any]]:
    """Read one ``results.json`` or every ``results.json`` below a folder (a sweep: one sub-folder per run).

    Returns a list (sorted by path) so a single run and a sweep feed :func:`quality_vs_sparsity` the same way.
    """
    root = Path(path_or_dir)
    if root.is_dir():
        paths = sorted(root.rglob(RESULTS_FILE))
        if not paths:
            raise VizFileNotFoundError(f"no results.json under {root}; run `python -m flux.evaluate` with its "
                                       "output folder inside this one (one sub-folder per routing)")
    elif root.is_file():
        paths = [root]
    else:
        raise VizFileNotFoundError(f"{root} not found; it is written by `python -m flux.evaluate`")
    return [read_results(path) | {"source": str(path)} for path in paths]


def load_bench(path_or_dir: str | Path) -> dict[str, Any]:
    """Read ``bench.json`` (a file, or a folder holding one): flat rows, or the sectioned file flux.bench writes."""
    path = _resolve(path_or_dir, BENCH_FILE, "`python -m flux.bench` (experiments/speed)")
    return read_bench(path) | {"source": str(path)}


@dataclass(frozen=True)
class RunFiles:
    """The output files found below one folder: a flux.train run, a flux.evaluate run, or a sweep of either.

    Each list is sorted by path. ``routing`` holds evaluation ``routing.jsonl`` files and the validation passes a
    training run leaves (``routing_maps/val_stepNNNNNN.routing.jsonl``).
    """

    root: Path
    results: tuple[Path, ...]
    routing: tuple[Path, ...]
    metrics: tuple[Path, ...]
    bench: tuple[Path, ...]

    def routing_file(self) -> Path:
        """The routing file to draw: an evaluated router's, else the last validation pass of training, else the
        first evaluation's."""
        evaluated = [p for p in self.routing if p.name == ROUTING_FILE]
        of_router = [p for p in evaluated if _evaluated_routing(p.parent / RESULTS_FILE) == "router"]
        passes = sorted((p for p in self.routing if p.name != ROUTING_FILE), key=lambda p: p.name)
        chosen = of_router[:1] or passes[-1:] or evaluated[:1]
        if not chosen:
            raise VizFileNotFoundError(f"no routing.jsonl under {self.root}; `python -m flux.evaluate` writes one per "
                                       "run, and `python -m flux.train` one per validation pass (routing_maps/)")
        return chosen[0]

    def metrics_file(self) -> Path:
        """The newest metrics.csv (a resumed or repeated run writes csv/version_N)."""
        if not self.metrics:
            raise VizFileNotFoundError(f"no metrics.csv under {self.root}; `python -m flux.train` writes it "
                                       "(<output_dir>/csv/version_N/metrics.csv)")
        return max(self.metrics, key=lambda p: (p.stat().st_mtime, str(p)))

    def bench_file(self) -> Path:
        if not self.bench:
            raise VizFileNotFoundError(f"no bench.json under {self.root}; `python -m flux.bench` writes it (GPU)")
        return self.bench[0]


def _evaluated_routing(results_file: Path) -> str | None:
    """The routing mode a results.json names, only to pick which routing file to draw; a missing or broken file
    gives None here and its own message where the results are loaded (load_results)."""
    try:
        routing = json.loads(results_file.read_text(encoding="utf-8")).get("routing")
    except (OSError, ValueError, AttributeError):
        return None
    return routing if isinstance(routing, str) else None


def find_run_files(root: str | Path) -> RunFiles:
    """Every results.json, routing file, metrics.csv and bench.json below `root`, whatever wrote the folder."""
    root = Path(root)
    if not root.is_dir():
        raise VizFileNotFoundError(f"run folder {root} not found; pass the output folder of flux.train, flux.evaluate "
                                   "or flux.bench, or a folder holding several (a sweep)")

    def below(pattern: str) -> tuple[Path, ...]:
        return tuple(sorted(p for p in root.rglob(pattern) if p.is_file()))

    return RunFiles(root, below(RESULTS_FILE), below(f"*{ROUTING_FILE}"), below("metrics.csv"), below(BENCH_FILE))


Metrics = dict[str, tuple[np.ndarray, np.ndarray]]


def load_metrics(path_or_dir: str | Path) -> Metrics:
    """Read Lightning's CSVLogger ``metrics.csv`` into ``{column: (steps, values)}``.

    Lightning writes one row per logging call, leaving the other columns empty; empty cells are therefore
    skipped per column (not an error), while a cell that is not a number is.
    """
    path = _resolve(path_or_dir, "metrics.csv", "`python -m flux.train logger=csv` (Lightning's CSVLogger)")
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        if "step" not in columns:
            raise VizInputError(f"{path}: no 'step' column (columns: {columns}); pass the metrics.csv that "
                                "Lightning's CSVLogger writes")
        series: dict[str, tuple[list[float], list[float]]] = {c: ([], []) for c in columns if c not in ("step", "epoch")}
        for lineno, row in enumerate(reader, start=2):
            step_cell = row.get("step") or ""
            if not step_cell.strip():
                continue
            try:
                step = float(step_cell)
            except ValueError:
                raise VizInputError(f"{path} line {lineno}: step={step_cell!r} is not a number")
            for column, (steps, values) in series.items():
                cell = (row.get(column) or "").strip()
                if not cell:
                    continue
                try:
                    values.append(float(cell))
                except ValueError:
                    raise VizInputError(f"{path} line {lineno}: {column}={cell!r} is not a number")
                steps.append(step)
    metrics = {c: (np.asarray(s), np.asarray(v)) for c, (s, v) in series.items() if v}
    if not metrics:
        raise VizInputError(f"{path} holds no logged values; train for at least one logging step "
                            "(trainer.log_every_n_steps) before plotting")
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------


def _task_palette() -> list[tuple[float, ...]]:
    """tab10/tab20 without their blues and oranges, which are reserved for FA and SA."""
    tab10 = list(matplotlib.colormaps["tab10"].colors)
    tab20 = list(matplotlib.colormaps["tab20"].colors)
    return tab10[2:] + tab20[5::2]


def task_colors(tasks: Iterable[str]) -> dict[str, tuple[float, ...]]:
    """Colour per task, assigned in sorted order so the same task set gets the same colours in every figure.

    Beyond 16 tasks colours repeat; the legend still names every task.
    """
    palette = _task_palette()
    return {name: palette[i % len(palette)] for i, name in enumerate(sorted(set(tasks)))}


def _grouped(records: Sequence[RoutingRecord]) -> list[RoutingRecord]:
    """Samples grouped by task (sorted), then by length, so a task's block in the heatmap reads left to right."""
    return sorted(records, key=lambda r: (r.task, r.length, r.id))


@_styled
def routing_heatmap(records: Sequence[RoutingRecord | Mapping[str, Any]], num_layers: int | None = None,
                    title: str | None = None) -> Figure:
    """Layer x sample map of decisions (blue FA, orange SA), samples grouped by task under a coloured task bar.

    Axes: ``fig.axes[0]`` is the task bar, ``fig.axes[1]`` the map whose image array is ``[num_layers, samples]``.
    """
    rows = _grouped(as_records(records, num_layers))
    grid = np.asarray([r.decisions for r in rows], dtype=float).T
    colors = task_colors(r.task for r in rows)
    task_index = {name: i for i, name in enumerate(colors)}
    layers, samples = grid.shape

    fig = Figure(figsize=(10, min(2.0 + 0.18 * layers, 9.0)), layout="constrained")
    bar_ax, map_ax = fig.subplots(2, 1, sharex=True, height_ratios=[1, max(4, layers // 2)])
    bar_ax.imshow(np.asarray([[task_index[r.task] for r in rows]]), aspect="auto", interpolation="nearest",
                  cmap=ListedColormap(list(colors.values())), vmin=-0.5, vmax=len(colors) - 0.5)
    bar_ax.set_yticks([])
    bar_ax.grid(False)
    bar_ax.tick_params(labelbottom=False)
    map_ax.imshow(grid, aspect="auto", interpolation="nearest", cmap=ListedColormap([FA_COLOR, SA_COLOR]),
                  vmin=0, vmax=1)
    map_ax.grid(False)
    map_ax.set_xlabel(f"samples, grouped by task and sorted by length ({samples} in all)")
    map_ax.set_ylabel("layer")
    # every layer labelled up to 32 layers (one row each is tall enough), else about 16 evenly spaced labels
    map_ax.set_yticks(range(0, layers, 1 if layers <= 32 else math.ceil(layers / 16)))
    map_ax.tick_params(axis="y", labelsize=7 if layers > 16 else 9)
    boundaries = [i for i in range(1, samples) if rows[i].task != rows[i - 1].task]
    for x in boundaries:
        map_ax.axvline(x - 0.5, color="white", linewidth=1.0)
    # one x label per task block, at its centre, instead of sample numbers that name nothing
    starts, ends = [0, *boundaries], [*boundaries, samples]
    rotate = len(starts) > 4
    map_ax.set_xticks([(s + e - 1) / 2 for s, e in zip(starts, ends, strict=True)],
                      [f"{rows[s].task} ({e - s})" for s, e in zip(starts, ends, strict=True)],
                      rotation=30 if rotate else 0, ha="right" if rotate else "center")
    handles = [Patch(color=FA_COLOR, label="FA (full)"), Patch(color=SA_COLOR, label="SA (sparse)")]
    handles += [Patch(color=c, label=name) for name, c in colors.items()]
    fig.legend(handles=handles, loc="outside right upper", frameon=False)
    sparsity = grid.mean()
    fig.suptitle(title or f"Routing decisions per layer and sample (SA fraction {sparsity:.0%})")
    return fig


@_styled
def layer_fa_probability(records: Sequence[RoutingRecord | Mapping[str, Any]], num_layers: int | None = None) -> Figure:
    """Per-layer probability of FA, one line per task plus the mean over all samples (dashed).

    Uses the router's gates when every record of a task has them, else the share of samples routed to FA.
    """
    rows = as_records(records, num_layers)
    colors = task_colors(r.task for r in rows)
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    layers = np.arange(rows[0].num_layers)
    sources: set[str] = set()
    for task, color in colors.items():
        task_rows = [r for r in rows if r.task == task]
        if all(r.gates is not None for r in task_rows):
            prob = np.mean([r.fa_probability() for r in task_rows], axis=0)
            sources.add("gates")
        else:
            prob = np.mean([1.0 - np.asarray(r.decisions, dtype=float) for r in task_rows], axis=0)
            sources.add("decisions")
        ax.plot(layers, prob, marker="o", markersize=3, color=color, label=f"{task} (n={len(task_rows)})")
    overall = np.mean([1.0 - np.asarray(r.decisions, dtype=float) for r in rows], axis=0)
    ax.plot(layers, overall, linestyle="--", color="black", label="all samples (decisions)")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("layer")
    ax.set_ylabel("P(full attention)")
    fig.legend(loc="outside right upper", frameon=False)
    ax.set_title(f"FA probability per layer and task (from {' / '.join(sorted(sources))})")
    return fig


def _box_with_points(ax: Any, groups: Sequence[np.ndarray], labels: Sequence[str], colors: Sequence[Any]) -> None:
    """Box plot with every sample drawn on top: evaluation sets are small, so the points carry the information."""
    positions = np.arange(1, len(groups) + 1)
    ax.boxplot(groups, positions=positions, widths=0.5, showfliers=False,
               medianprops={"color": "black"}, boxprops={"color": "#555555"})
    rng = np.random.default_rng(0)
    for pos, values, color in zip(positions, groups, colors, strict=True):
        jitter = rng.uniform(-0.12, 0.12, size=len(values))
        ax.scatter(pos + jitter, values, s=12, color=color, alpha=0.8, zorder=3)
    ax.set_xticks(positions, labels, rotation=30, ha="right")
    ax.set_ylim(-0.03, 1.03)


@_styled
def sparsity_distribution(records: Sequence[RoutingRecord | Mapping[str, Any]],
                          num_layers: int | None = None) -> Figure:
    """Per-sample sparsity (share of SA layers): left by task, right by input length."""
    rows = as_records(records, num_layers)
    colors = task_colors(r.task for r in rows)
    fig = Figure(figsize=(10, 4), layout="constrained")
    task_ax, length_ax = fig.subplots(1, 2, sharey=True)
    tasks = list(colors)
    _box_with_points(task_ax, [np.asarray([r.sparsity for r in rows if r.task == t]) for t in tasks], tasks,
                     [colors[t] for t in tasks])
    task_ax.set_ylabel("sample sparsity (share of SA layers)")
    task_ax.set_title("by task")
    buckets = length_buckets([r.length for r in rows])
    groups = [np.asarray([r.sparsity for r in rows if lo < r.length <= hi]) for lo, hi, _ in buckets]
    _box_with_points(length_ax, groups, [f"{label}\n(n={len(g)})" for (_, _, label), g in zip(buckets, groups,
                                                                                              strict=True)],
                     [SA_COLOR] * len(buckets))
    length_ax.set_xlabel("input length (tokens)")
    length_ax.set_title("by length")
    fig.suptitle(f"Per-sample sparsity ({len(rows)} samples)")
    return fig


def _tokens(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def length_buckets(lengths: Sequence[int], max_buckets: int = 6) -> list[tuple[int, int, str]]:
    """(low, high, label) ranges `low < length <= high` for the by-length panel: each distinct length when there are
    at most `max_buckets` of them, else powers of two ("2k-4k" holds 2049..4096 tokens), so the prompts of a 4k
    evaluation cell (a few tokens short of 4096 each) share one box instead of one box per token count."""
    distinct = sorted(set(lengths))
    if len(distinct) <= max_buckets:
        return [(n - 1, n, str(n)) for n in distinct]
    highs = sorted({1 << max(0, math.ceil(math.log2(n))) for n in distinct})
    return [(h // 2, h, f"{_tokens(h // 2)}–{_tokens(h)}") for h in highs]


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1, ties sharing their mean rank (for Spearman's rho)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=float)
    ranks[order] = np.arange(len(values), dtype=float)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation; None when it is undefined (fewer than 3 points, or a constant side)."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def per_input_stats(records: Sequence[RoutingRecord | Mapping[str, Any]], prop: str = "needle_distance_tokens",
                    num_layers: int | None = None) -> list[dict[str, Any]]:
    """Per task, how much the router's Ω varies across inputs of that task: samples, mean and standard deviation of
    the per-sample Ω, how many distinct layer plans the samples got, and Spearman's rho between Ω and the per-input
    property `prop` over the samples that record it (None when none does or it is undefined)."""
    if prop not in ROUTING_META_KEYS:
        raise VizInputError(f"prop={prop!r} is not a per-input property of routing.jsonl; use one of "
                            f"{list(ROUTING_META_KEYS)}")
    rows = as_records(records, num_layers)
    stats = []
    for task in sorted({r.task for r in rows}):
        task_rows = [r for r in rows if r.task == task]
        omega = np.asarray([r.sparsity for r in task_rows])
        placed = [r for r in task_rows if prop in r.meta]
        stats.append({"task": task, "task_type": task_rows[0].task_type, "n": len(task_rows),
                      "omega_mean": float(omega.mean()), "omega_std": float(omega.std()),
                      "distinct_plans": len({r.decisions for r in task_rows}), "with_prop": len(placed),
                      "spearman": spearman([r.meta[prop] for r in placed], [r.sparsity for r in placed])})
    return stats


def _plans(count: int) -> str:
    return f"{count} plan" + ("" if count == 1 else "s")


_PROP_LABELS = {"needle_distance_tokens": "tokens from the answer to the question",
                "needle_depth": "answer depth in the context (0 = start)"}


@_styled
def context_awareness(records: Sequence[RoutingRecord | Mapping[str, Any]], prop: str = "needle_distance_tokens",
                      window: int | None = None, num_layers: int | None = None) -> Figure:
    """Does the router adapt per input? Left: per task, each input's Ω (share of layers on SA), with how many
    distinct layer plans the task's inputs got. Right: Ω against a per-input property (`prop`, from routing.jsonl's
    meta: by default how far the answer sits from the question), one colour per task with Spearman's rho in the
    legend, and the sparse window (`window` tokens) marked: an answer closer than that is visible to SA layers.
    Samples without the property are left out of the right panel, which says so when none has it."""
    stats = per_input_stats(records, prop, num_layers)
    rows = as_records(records, num_layers)
    colors = task_colors(r.task for r in rows)
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    spread_ax, prop_ax = fig.subplots(1, 2, width_ratios=[1, 1.2])
    tasks = [s["task"] for s in stats]
    _box_with_points(spread_ax, [np.asarray([r.sparsity for r in rows if r.task == t]) for t in tasks],
                     [f"{s['task']}\n{_plans(s['distinct_plans'])} / {s['n']}" for s in stats],
                     [colors[t] for t in tasks])
    spread_ax.set_ylabel("Ω per input (share of SA layers)")
    spread_ax.set_title("Ω across the inputs of each task")
    placed = [r for r in rows if prop in r.meta]
    prop_ax.set_ylim(-0.03, 1.03)
    prop_ax.set_xlabel(_PROP_LABELS.get(prop, prop))
    prop_ax.set_title(f"Ω against {prop}")
    if not placed:
        prop_ax.text(0.5, 0.5, f"no sample records {prop}\n(flux.evaluate records it for RULER retrieval tasks;\n"
                     "evaluate again with this flux to draw it)", transform=prop_ax.transAxes, ha="center",
                     va="center", color="#888888")
    by_task = {s["task"]: s for s in stats}
    for task in sorted({r.task for r in placed}):
        task_rows = [r for r in placed if r.task == task]
        rho = by_task[task]["spearman"]
        label = f"{task} (n={len(task_rows)}, ρ={rho:+.2f})" if rho is not None else f"{task} (n={len(task_rows)})"
        prop_ax.scatter([r.meta[prop] for r in task_rows], [r.sparsity for r in task_rows], s=16, alpha=0.8,
                        color=colors[task], label=label)
    if placed and window is not None and prop == "needle_distance_tokens":
        prop_ax.axvline(window, color=SA_COLOR, linestyle="--", linewidth=1, label=f"sparse window ({window})")
    if placed:
        prop_ax.legend(loc="best", frameon=False)
    fig.suptitle(f"Context awareness per input ({len(rows)} samples, {len(placed)} with {prop})")
    return fig


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats on both axes (both maximised), ordered by the first coordinate."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(ox >= x and oy >= y and (ox > x or oy > y) for j, (ox, oy) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def _task_point(run: Mapping[str, Any], task: str) -> tuple[float, float]:
    """Sample-weighted (sparsity, score) of one task across lengths."""
    rows = [r for r in run["results"] if r["task"] == task]
    if not rows:
        known = sorted({r["task"] for r in run["results"]})
        raise VizInputError(f"{run['source']}: no results for task={task!r}; tasks there: {known}")
    n = np.asarray([r["n"] for r in rows], dtype=float)
    return (float(np.average([r["sparsity"] for r in rows], weights=n)),
            float(np.average([r["score"] for r in rows], weights=n)))


@_styled
def quality_vs_sparsity(results_list: Sequence[Mapping[str, Any]], task: str | None = None,
                        labels: Sequence[str] | None = None) -> Figure:
    """Score against sparsity for each run (dense, router, baselines), with the Pareto front of the runs.

    ``task`` plots one task's sample-weighted score and sparsity instead of the run summary. ``labels`` names each
    run's point (e.g. the values a sweep set, from experiments/tables.py); by default the routing, and for runs that
    share one, their folder name. Each routing has its own colour and marker (listed in the legend), so baselines
    stay apart from routers; the points on the Pareto front are ringed and joined by the front line.
    """
    runs = [_checked_run(run, f"results_list[{i}]") for i, run in enumerate(results_list)]
    if not runs:
        raise VizInputError("results_list is empty; pass load_results(<sweep folder>) with at least one run")
    if labels is not None and len(labels) != len(runs):
        raise VizInputError(f"labels has {len(labels)} entries for {len(runs)} runs; give one label per run")
    points = [(float(r["summary"]["sparsity"]), float(r["summary"]["score"])) if task is None
              else _task_point(r, task) for r in runs]
    names = [str(r["routing"]) for r in runs]
    if labels is None:
        # Runs sharing a routing (e.g. a sweep over targets) are told apart by their folder name.
        labels = [f"{name} ({Path(r['source']).parent.name or i})" if names.count(name) > 1 else name
                  for i, (name, r) in enumerate(zip(names, runs, strict=True))]

    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.subplots()
    front = pareto_front(points)
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], color="#bbbbbb", linewidth=1.5,
            zorder=1, label="Pareto front")
    ax.scatter([points[i][0] for i in front], [points[i][1] for i in front], s=170, facecolors="none",
               edgecolors="#777777", linewidths=1.0, zorder=2, gid=PARETO_RING)
    fallback = iter(matplotlib.colormaps["Dark2"].colors)
    styles: dict[str, tuple[Any, str]] = {}
    for (x, y), name, label in zip(points, names, labels, strict=True):
        first = name not in styles
        color, marker = styles.setdefault(name, ROUTING_STYLES.get(name) or (next(fallback, "#444444"), "P"))
        ax.scatter([x], [y], color=color, marker=marker, s=90 if name == "router" else 50, zorder=3,
                   edgecolor="white", linewidth=0.5, label=name if first else None)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    dense = [p for p, name in zip(points, names, strict=True) if name == "dense"]
    if dense:
        ax.axhline(dense[0][1], color=ROUTING_STYLES["dense"][0], linestyle=":", linewidth=1, label="dense score")
    ax.set_xlim(-0.05, 1.05)
    ax.set_xlabel("sparsity (share of layers on SA)")
    ax.set_ylabel(f"score ({task})" if task else "score (all tasks)")
    ax.legend(loc="lower left", frameon=False)
    ax.set_title(f"Quality vs sparsity — {runs[0]['backbone']}")
    return fig


@_styled
def speedup_vs_length(bench: Mapping[str, Any]) -> Figure:
    """Speedup over dense vs context length; prefill and decode panels, one line per SA fraction (and batch)."""
    data = validate_bench(bench, _source_of(bench, "bench"))
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    fractions = sorted({float(r["sa_fraction"]) for r in data["rows"]})
    cmap = matplotlib.colormaps["viridis"]
    colors = {f: cmap(0.15 + 0.7 * i / max(1, len(fractions) - 1)) for i, f in enumerate(fractions)}
    linestyles = ("-", "--", ":", "-.")
    for ax, phase in zip(axes, BENCH_PHASES, strict=True):
        rows = [r for r in data["rows"] if r["phase"] == phase]
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
        ax.set_title(phase)
        ax.set_xlabel("context length (tokens)")
        if not rows:
            ax.text(0.5, 0.5, f"no {phase} rows in bench.json", transform=ax.transAxes, ha="center")
            continue
        batches = sorted({r["batch"] for r in rows})
        for b_index, batch in enumerate(batches):
            for fraction in fractions:
                line = sorted((r["context"], r["speedup"]) for r in rows
                              if r["batch"] == batch and float(r["sa_fraction"]) == fraction)
                if not line:
                    continue
                label = f"SA {fraction:.0%}" + (f", batch {batch}" if len(batches) > 1 else "")
                ax.plot([c for c, _ in line], [s for _, s in line], marker="o", markersize=3,
                        color=colors[fraction], linestyle=linestyles[b_index % len(linestyles)], label=label)
        ax.set_xscale("log", base=2)
        ax.legend(loc="upper left", frameon=False)
    axes[0].set_ylabel("speedup vs dense (×)")
    fig.suptitle(f"Speedup vs context — {data['backbone']} on {data['device']} "
                 f"(dense: {data.get('dense_backend', 'n/a')})")
    return fig


def _series(metrics: Mapping[str, tuple[np.ndarray, np.ndarray]], name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """A logged metric by name; Lightning appends ``_step`` when a value is also logged per epoch."""
    return metrics.get(name) or metrics.get(f"{name}_step")


@_styled
def training_curves(metrics: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> Figure:
    """Four panels: loss parts, sparsity vs target (overall and per task), Gumbel temperature, Lagrange multipliers."""
    panels: list[tuple[str, list[tuple[str, str, dict[str, Any]]]]] = [
        ("loss", [("train/loss", "total", {"color": "black"}), ("train/loss_lm", "LM", {}),
                  ("train/loss_kl", "KL (distill)", {})]),
        ("sparsity", [("train/sparsity_soft", "soft", {"color": SA_COLOR, "linewidth": 2.5, "alpha": 0.6}),
                      ("train/sparsity_hard", "hard", {"color": "#8c4a0b"}),
                      ("train/target", "target", {"color": "black", "linestyle": "--"})]),
        ("temperature τ", [("train/tau", "τ", {"color": "#9467bd"})]),
        ("Lagrange multipliers", [("train/lambda1", "λ1", {}), ("train/lambda2", "λ2", {})]),
    ]
    per_task = sorted(name.removesuffix("_step") for name in metrics if name.startswith("train/sparsity/")
                      and not name.endswith("_epoch"))
    colors = task_colors(name.removeprefix("train/sparsity/") for name in per_task)
    panels[1][1].extend((name, name.removeprefix("train/sparsity/"),
                         {"color": colors[name.removeprefix("train/sparsity/")], "linewidth": 0.8, "alpha": 0.7})
                        for name in per_task)
    wanted = [name for _, lines in panels for name, _, _ in lines]
    if not any(_series(metrics, name) is not None for name in wanted):
        raise VizInputError(f"metrics hold none of the training columns {wanted[:8]}...; got {sorted(metrics)[:8]}; "
                            "pass the metrics.csv of a flux.train run")
    fig = Figure(figsize=(11, 7), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True).ravel()
    for ax, (title, lines) in zip(axes, panels, strict=True):
        ax.set_title(title)
        drawn = 0
        for name, label, style in lines:
            series = _series(metrics, name)
            if series is None:
                continue
            ax.plot(series[0], series[1], label=label, **style)
            drawn += 1
        if drawn:
            ax.legend(loc="best", frameon=False, ncols=2 if drawn > 4 else 1)
        else:
            ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", color="#888888")
    for ax in axes[2:]:
        ax.set_xlabel("step")
    fig.suptitle("Training curves")
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG (creating parent folders) and return the path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise VizInputError(f"save_figure writes PNG files; got {path}: use a path ending in .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context(_STYLE):
        fig.savefig(path, format="png", bbox_inches="tight")
    return path
