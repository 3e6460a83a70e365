"""Gather the results.json files of a sweep into paper-style markdown and CSV tables, and a Pareto figure.

    python experiments/tables.py RUN_DIR_OR_GLOB [...] --out experiments/tables/NAME [--pareto]
        [--markdown FILE] [--title TITLE] [--command CMD ...]

Each argument is a results.json file, a folder searched recursively for results.json (a sweep folder: every job's
`eval/results.json`), or a glob (quote it to let this script expand `**`). Rows are methods (dense, router, all-SA,
static, first_dense, random); every table has a sparsity column (mean share of layers on sparse attention over the
samples the table covers). Runs that share a method and its cells (the routers of a sweep) are labelled by the
values they were swept over: the overrides in their results.json provenance that differ between them (then by their
sparse-pattern settings, then by folder). Tables are written only for the benchmark families present: RULER by
length, by task and by task type, LongBench and LongBench-E by category, LongBench-E by length bucket, LongBench-v2
easy/hard/length classes, math, user JSONL tasks and perplexity. Scores are percentages; which averages are micro
(sample-weighted) or macro is stated under each table. `--pareto` draws score vs Ω for every run (flux.viz) into
pareto.png, the Pareto front marked and baselines by their own markers; `--markdown FILE` writes everything as one
page (the commands first) that links the figure.
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flux.data.synthetic import TASKS as SYNTHETIC_TASKS
from flux.evals.base import TASK_TYPES
from flux.evals.longbench_spec import CATEGORIES, LONGBENCH_DATASETS, LONGBENCH_E_BUCKETS
from flux.evals.longbench_v2 import DIFFICULTIES, LENGTH_CLASSES
from flux.evals.results import RESULTS_FILE, read_results

FAMILIES = ("ruler", "longbench", "longbench_e", "longbench_v2", "math", "jsonl", "ppl")
ROUTING_ORDER = ("dense", "router", "sparse", "static", "first_dense", "random")
ROUTING_NAMES = {"dense": "Dense (all FA)", "router": "Router", "sparse": "All SA", "static": "Static",
                 "first_dense": "First-k dense", "random": "Random"}
# Baselines whose layer plan is fixed by a sparsity level: their label carries it, so levels become separate rows.
LEVEL_ROUTINGS = ("static", "first_dense", "random")
MATH_NAMES = {"gsm8k": "GSM8K", "math500": "MATH-500", "aime": "AIME"}
MISSING = "–"
PARETO_FILE = "pareto.png"
# The label of a sweep's run that sets none of the swept values (e.g. the base recipe of an ablation).
NO_SWEPT_OVERRIDE = "no swept override"


class TablesInputError(ValueError):
    """Bad command-line input: nothing found, or results that cannot be told apart or placed in a table."""


@dataclass
class Row:
    task: str
    length: int
    n: int
    score: float
    sparsity: float


@dataclass
class Method:
    """All rows of one method (possibly merged from several runs, e.g. one run per benchmark)."""

    label: str
    routing: str
    level: float
    sources: list[str] = field(default_factory=list)
    rows: dict[str, list[Row]] = field(default_factory=dict)  # family -> rows (task without the family prefix)


@dataclass
class Table:
    name: str
    title: str
    note: str
    columns: list[str]
    rows: list[tuple[str, list[float | None], float]]  # (method label, cells, sparsity)
    number_format: str = "{:.1f}"


# --------------------------------------------------------------------------------------------------- input


def find_results(args: Sequence[str]) -> list[Path]:
    """results.json files named by the arguments (files, folders searched recursively, or globs)."""
    found: list[Path] = []
    for arg in args:
        matches = [Path(m) for m in sorted(glob.glob(arg, recursive=True))] if glob.has_magic(arg) else [Path(arg)]
        paths: list[Path] = []
        for m in matches:
            paths += sorted(m.rglob(RESULTS_FILE)) if m.is_dir() else [m] if m.is_file() else []
        if not paths:
            raise TablesInputError(f"{arg}: no {RESULTS_FILE} found (give run folders, results.json files or a glob)")
        found += [p for p in paths if p not in found]
    return found


def _split_task(task: str, length: int, source: str) -> tuple[str, str]:
    """(family, name) of a row's task; rows a table could not place are rejected rather than left out."""
    family, _, name = task.partition("/")
    if family not in FAMILIES or not name:
        raise TablesInputError(f"{source}: task {task!r} is not '<family>/<name>' with a family in {FAMILIES}")
    if family in ("longbench", "longbench_e") and name not in LONGBENCH_DATASETS:
        raise TablesInputError(f"{source}: {task!r} is not a LongBench dataset ({sorted(LONGBENCH_DATASETS)})")
    if family == "longbench_e" and length not in {lo for lo, _ in LONGBENCH_E_BUCKETS}:
        raise TablesInputError(f"{source}: {task!r} length {length} is not a LongBench-E bucket lower bound")
    if family == "longbench_v2" and (name not in DIFFICULTIES or length not in LENGTH_CLASSES.values()):
        raise TablesInputError(f"{source}: {task!r} at length {length} is not a LongBench-v2 "
                               f"difficulty {DIFFICULTIES} at a length-class bound {list(LENGTH_CLASSES.values())}")
    return family, name


def _base_label(run: Mapping[str, Any]) -> tuple[str, float]:
    routing = run["routing"]
    level = run["summary"]["sparsity"]
    name = ROUTING_NAMES.get(routing, routing)
    return (f"{name} (Ω={level:.2f})" if routing in LEVEL_ROUTINGS else name), level


def _overrides(run: Mapping[str, Any]) -> dict[str, str] | None:
    """{key: value} of the Hydra overrides in a run's provenance (None for files written without provenance).
    `+`/`++` prefixes are dropped; deletions (`~key`) are left out: they follow from the values that are swept."""
    provenance = run.get("provenance")
    if not provenance:
        return None
    parsed: dict[str, str] = {}
    for override in provenance["overrides"]:
        if override.startswith("~"):
            continue
        key, _, value = override.partition("=")
        parsed[key.lstrip("+")] = value
    return parsed


def _swept_labels(runs: Sequence[Mapping[str, Any]]) -> list[str] | None:
    """Each run's `key=value` for the overrides whose value differs between the runs (in the order the runs give
    them); None when a run has no provenance."""
    parsed = [_overrides(run) for run in runs]
    if any(p is None for p in parsed):
        return None
    keys = list(dict.fromkeys(k for p in parsed for k in p))
    differing = [k for k in keys if len({p.get(k) for p in parsed}) > 1]
    return [", ".join(f"{k}={p[k]}" for k in differing if k in p) or NO_SWEPT_OVERRIDE for p in parsed]


def _sparse_diff(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    keys = sorted({k for r in runs for k in r["sparse"]})
    differing = [k for k in keys if len({repr(r["sparse"].get(k)) for r in runs}) > 1]
    return [", ".join(f"{k}={r['sparse'].get(k)}" for k in differing) for r in runs]


def group_methods(runs: Sequence[dict[str, Any]]) -> list[Method]:
    """Merge runs into methods by label; runs with the same label and overlapping cells are told apart by their
    sparse-pattern settings, else by their folder name."""
    by_label: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_label.setdefault(_base_label(run)[0], []).append(run)
    labelled: list[tuple[str, dict[str, Any]]] = []
    for label, group in by_label.items():
        cells = [{(r["task"], r["length"]) for r in run["results"]} for run in group]
        overlapping = any(cells[i] & cells[j] for i in range(len(group)) for j in range(i))
        if not overlapping:
            labelled += [(label, run) for run in group]
            continue
        suffixes = _swept_labels(group)
        if suffixes is None or len(set(suffixes)) < len(group):
            suffixes = _sparse_diff(group)
        if len(set(suffixes)) < len(group):
            suffixes = [Path(run["source"]).parent.name for run in group]
        if len(set(suffixes)) < len(group):
            raise TablesInputError(f"runs {[r['source'] for r in group]} share the label {label!r} and cells; "
                                   "keep each run in its own folder")
        labelled += [(f"{label} [{s}]", run) for s, run in zip(suffixes, group)]

    methods: dict[str, Method] = {}
    for label, run in labelled:
        method = methods.setdefault(label, Method(label, run["routing"], run["summary"]["sparsity"]))
        method.sources.append(run["source"])
        for r in run["results"]:
            family, task = _split_task(r["task"], r["length"], run["source"])
            method.rows.setdefault(family, []).append(Row(task, r["length"], r["n"], r["score"], r["sparsity"]))
    order = {name: i for i, name in enumerate(ROUTING_ORDER)}
    return sorted(methods.values(), key=lambda m: (order.get(m.routing, len(order)), m.routing, m.level, m.label))


# --------------------------------------------------------------------------------------------------- averaging


def micro(rows: Iterable[Row], key: str = "score") -> float | None:
    """Sample-weighted mean of `key` over rows (None when there are none)."""
    rows = list(rows)
    total = sum(r.n for r in rows)
    return sum(getattr(r, key) * r.n for r in rows) / total if total else None


def macro(values: Iterable[float | None]) -> float | None:
    """Unweighted mean of the values that exist."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _pct(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def _table(name: str, title: str, note: str, columns: list[str], methods: Sequence[Method], family: str,
           cells: Callable[[list[Row]], list[float | None]], number_format: str = "{:.1f}") -> Table | None:
    """One table over `family`; when the last column is "Avg", a method missing a cell that another method has
    gets no average, since an average over fewer cells would not be comparable."""
    rows = [(m.label, cells(m.rows[family]), micro(m.rows[family], "sparsity")) for m in methods if family in m.rows]
    if not rows:
        return None
    if columns[-1] == "Avg":
        filled = [any(r[1][j] is not None for r in rows) for j in range(len(columns) - 1)]
        for _, values, _ in rows:
            if any(f and v is None for f, v in zip(filled, values)):
                values[-1] = None
    counts = sorted({r.n for m in methods for r in m.rows.get(family, ())})
    n_note = f"n per cell: {counts[0]}" if len(counts) == 1 else f"n per cell: {counts[0]}-{counts[-1]}"
    return Table(name, title, f"{note} {n_note}.", columns, rows, number_format)


# --------------------------------------------------------------------------------------------------- tables


def ruler_tables(methods: Sequence[Method]) -> list[Table]:
    rows = [r for m in methods for r in m.rows.get("ruler", ())]
    lengths = sorted({r.length for r in rows})
    tasks = sorted({r.task for r in rows})

    def by_length(rs: list[Row]) -> list[float | None]:
        return [_pct(micro(r for r in rs if r.length == L)) for L in lengths] + [_pct(micro(rs))]

    def by_task(rs: list[Row]) -> list[float | None]:
        return [_pct(micro(r for r in rs if r.task == t)) for t in tasks] + [_pct(micro(rs))]

    types = [kind for kind in TASK_TYPES if any(_task_type(t) == kind for t in tasks)]

    def by_type(rs: list[Row]) -> list[float | None]:
        scores = [_pct(micro(r for r in rs if _task_type(r.task) == kind)) for kind in types]
        omegas = [_pct(micro((r for r in rs if _task_type(r.task) == kind), "sparsity")) for kind in types]
        return scores + [_pct(micro(rs))] + omegas

    return [t for t in (
        _table("ruler_by_type", "RULER-style suite by task type",
               "Score (%) per task type and Ω (%, share of layers on SA) per task type, sample-weighted; Avg is the "
               "score over every cell.", types + ["Avg"] + [f"Ω {kind}" for kind in types], methods, "ruler",
               by_type) if types else None,
        _table("ruler_by_length", "RULER-style suite by context length (tokens)",
               "Score (%) over all tasks at each length; Avg is sample-weighted over every cell.",
               [_length_label(L) for L in lengths] + ["Avg"], methods, "ruler", by_length),
        _table("ruler_by_task", "RULER-style suite by task",
               "Score (%) per task over all lengths; Avg is sample-weighted over every cell.",
               tasks + ["Avg"], methods, "ruler", by_task),
    ) if t is not None]


def _task_type(task: str) -> str | None:
    """retrieval | holistic for the synthetic RULER-style tasks (None for a name flux does not generate)."""
    spec = SYNTHETIC_TASKS.get(task)
    return spec.task_type if spec is not None else None


def _length_label(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


def _dataset_scores(rs: list[Row]) -> dict[str, float]:
    return {d: micro(r for r in rs if r.task == d) for d in sorted({r.task for r in rs})}


def _category_cells(rs: list[Row]) -> list[float | None]:
    scores = _dataset_scores(rs)
    per_category = [macro(s for d, s in scores.items() if LONGBENCH_DATASETS[d].category == c) for c in CATEGORIES]
    return [_pct(v) for v in per_category] + [_pct(macro(per_category))]


def longbench_tables(methods: Sequence[Method]) -> list[Table]:
    note = ("Score (%) per category = mean of its datasets; Avg = mean of the categories present "
            "(datasets scored with the official metrics).")
    tables = [
        _table("longbench", "LongBench by category", note, list(CATEGORIES) + ["Avg"], methods, "longbench",
               _category_cells),
        _table("longbench_e_by_category", "LongBench-E by category", note, list(CATEGORIES) + ["Avg"], methods,
               "longbench_e", _category_cells),
    ]

    def by_bucket(rs: list[Row]) -> list[float | None]:
        buckets = [macro(_dataset_scores([r for r in rs if r.length == lo]).values()) for lo, _ in LONGBENCH_E_BUCKETS]
        return [_pct(v) for v in buckets]

    tables.append(_table("longbench_e_by_length", "LongBench-E by context length (words)",
                         "Score (%) per length bucket = mean over the datasets with samples in it.",
                         [label for _, label in LONGBENCH_E_BUCKETS], methods, "longbench_e", by_bucket))
    return [t for t in tables if t is not None]


def longbench_v2_table(methods: Sequence[Method]) -> list[Table]:
    def cells(rs: list[Row]) -> list[float | None]:
        return ([_pct(micro(rs))] + [_pct(micro(r for r in rs if r.task == d)) for d in DIFFICULTIES]
                + [_pct(micro(r for r in rs if r.length == lo)) for lo in LENGTH_CLASSES.values()])

    columns = ["Overall"] + [d.capitalize() for d in DIFFICULTIES] + [c.capitalize() for c in LENGTH_CLASSES]
    table = _table("longbench_v2", "LongBench-v2", "Accuracy (%), sample-weighted within each column.", columns,
                   methods, "longbench_v2", cells)
    return [table] if table else []


def _named_columns_table(methods: Sequence[Method], family: str, title: str, note: str,
                         display: Mapping[str, str]) -> list[Table]:
    names = sorted({r.task for m in methods for r in m.rows.get(family, ())},
                   key=lambda t: (list(display).index(t) if t in display else len(display), t))

    def cells(rs: list[Row]) -> list[float | None]:
        per = [_pct(micro(r for r in rs if r.task == t)) for t in names]
        return per + [macro(per)]

    table = _table(family, title, note, [display.get(t, t) for t in names] + ["Avg"], methods, family, cells)
    return [table] if table else []


def ppl_table(methods: Sequence[Method]) -> list[Table]:
    cells_at = sorted({(r.task, r.length) for m in methods for r in m.rows.get("ppl", ())})

    def cells(rs: list[Row]) -> list[float | None]:
        # A ppl row's score is exp(-mean NLL), so perplexity is its inverse (lower is better).
        score = {(r.task, r.length): r.score for r in rs}
        return [None if key not in score else 1.0 / score[key] if score[key] > 0 else float("inf") for key in cells_at]

    table = _table("ppl", "Perplexity", "Perplexity (lower is better) per text and window (tokens).",
                   [f"{t} @{w}" for t, w in cells_at], methods, "ppl", cells, "{:.2f}")
    return [table] if table else []


def build_tables(methods: Sequence[Method]) -> list[Table]:
    return (ruler_tables(methods) + longbench_tables(methods) + longbench_v2_table(methods)
            + _named_columns_table(methods, "math", "Math", "Accuracy (%) per dataset; Avg = mean of the datasets.",
                                   MATH_NAMES)
            + _named_columns_table(methods, "jsonl", "User JSONL tasks",
                                   "Score (%) per task (any answer contained); Avg = mean of the tasks.", {})
            + ppl_table(methods))


# --------------------------------------------------------------------------------------------------- output


def _fmt(value: float | None, number_format: str) -> str:
    return MISSING if value is None else number_format.format(value)


def to_markdown(table: Table) -> str:
    header = ["Method"] + table.columns + ["Sparsity"]
    lines = [f"### {table.title}", "", "| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + [":-:"] * (len(header) - 1)) + "|"]
    for label, cells, sparsity in table.rows:
        values = [_fmt(c, table.number_format) for c in cells] + [f"{sparsity:.2f}"]
        lines.append("| " + " | ".join([label] + values) + " |")
    lines += ["", f"{table.note} Sparsity: mean share of layers on sparse attention.", ""]
    return "\n".join(lines)


def write_csv(table: Table, path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method"] + table.columns + ["sparsity"])
        for label, cells, sparsity in table.rows:
            writer.writerow([label] + ["" if c is None else f"{c:.4f}" for c in cells] + [f"{sparsity:.4f}"])


def _short(value: str | None, n: int = 12) -> str:
    return "?" if not value else value[:n]


def _wandb_runs(checkpoint_source: str) -> list[str]:
    """W&B run folders of the training job that exported a router (flux.train writes <job>/router and
    <job>/wandb/*run-*), for the runs list."""
    job = Path(checkpoint_source).parent
    return sorted(str(p) for p in (job / "wandb").glob("*run-*") if p.is_dir())


def run_lines(methods: Sequence[Method], runs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One bullet per method and its runs: the results files and, where recorded, how each run was made."""
    lines = []
    for m in methods:
        lines.append(f"- {m.label}: " + ", ".join(f"`{s}`" for s in m.sources))
        for source in m.sources:
            prov = runs[source].get("provenance")
            if not prov:
                continue
            code = prov["code"]
            dirty = {True: " (dirty tree)", False: "", None: ""}[code["dirty"]]
            facts = [f"overrides `{' '.join(prov['overrides']) or '(none)'}`",
                     f"commit `{_short(code['commit'])}`{dirty}", f"started {prov['date']}"]
            if prov["checkpoint"]:
                facts.insert(1, f"router weights sha256 `{_short(prov['checkpoint']['weights_sha256'])}`")
                facts += [f"W&B run `{w}`" for w in _wandb_runs(prov["checkpoint"]["source"])]
            lines.append("  - " + "; ".join(facts))
    return lines


def _compact(label: str) -> str:
    """A figure label: `a.b.c=v` parts shortened to `c=v`."""
    return ", ".join(part.split(".")[-1] if "=" not in part else
                     f"{part.partition('=')[0].split('.')[-1]}={part.partition('=')[2]}"
                     for part in label.split(", "))


def draw_pareto(methods: Sequence[Method], runs: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """Score vs Ω of every run (flux.viz.quality_vs_sparsity), labelled by its method's label."""
    from flux import viz

    label_of = {source: m.label for m in methods for source in m.sources}
    ordered = list(runs)
    labels = []
    for source in ordered:
        label = label_of[source]
        inner = label[label.index("[") + 1:-1] if label.endswith("]") and "[" in label else label
        labels.append(_compact(inner))
    figure = viz.quality_vs_sparsity([runs[s] for s in ordered], labels=labels)
    return viz.save_figure(figure, path)


def render_page(tables: Sequence[Table], methods: Sequence[Method], runs: Mapping[str, Mapping[str, Any]],
                title: str | None, commands: Sequence[str], figure: Path | None, base: Path) -> str:
    """The markdown page: title, the commands that made the runs, the Pareto figure (linked relative to `base`), the
    tables, and the runs they were built from."""
    parts = [f"# {title}\n"] if title else []
    if commands:
        parts.append("```bash\n" + "\n".join(commands) + "\n```\n")
    if figure is not None:
        parts.append(f"![score vs sparsity]({Path(os.path.relpath(figure, base)).as_posix()})\n")
    parts.append("\n".join(to_markdown(t) for t in tables))
    parts.append("#### Runs\n\n" + "\n".join(run_lines(methods, runs)) + "\n")
    return "\n".join(parts)


def write_tables(tables: Sequence[Table], methods: Sequence[Method], out: Path,
                 runs: Mapping[str, Mapping[str, Any]] | None = None, title: str | None = None,
                 commands: Sequence[str] = (), pareto: bool = False, markdown: Path | None = None) -> Path:
    """One .md and one .csv per table, plus README.md with every table and the runs it was built from (and, on
    request, pareto.png and the same page at `markdown`)."""
    out.mkdir(parents=True, exist_ok=True)
    runs = runs or {s: {} for m in methods for s in m.sources}
    for table in tables:
        (out / f"{table.name}.md").write_text(to_markdown(table), encoding="utf-8")
        write_csv(table, out / f"{table.name}.csv")
    figure = draw_pareto(methods, runs, out / PARETO_FILE) if pareto else None
    readme = out / "README.md"
    readme.write_text(render_page(tables, methods, runs, title, commands, figure, out), encoding="utf-8")
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(render_page(tables, methods, runs, title, commands, figure, markdown.parent),
                            encoding="utf-8")
    return readme


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="results.json files, run or sweep folders, or globs")
    parser.add_argument("--out", required=True, type=Path, help="output folder, e.g. experiments/tables/smollm2")
    parser.add_argument("--pareto", action="store_true", help="also draw score vs sparsity (pareto.png)")
    parser.add_argument("--markdown", type=Path, help="also write the whole page to this file")
    parser.add_argument("--title", help="a heading for the page")
    parser.add_argument("--command", action="append", default=[], help="a command that made the runs (repeatable)")
    args = parser.parse_args(argv)
    try:
        runs: dict[str, dict[str, Any]] = {}
        for path in find_results(args.runs):
            runs[str(path)] = dict(read_results(path), source=str(path))
        methods = group_methods(list(runs.values()))
        tables = build_tables(methods)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    readme = write_tables(tables, methods, args.out, runs, args.title, args.command, args.pareto, args.markdown)
    sys.stdout.write(readme.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
