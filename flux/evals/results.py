"""`results.json` and `routing.jsonl`: the two files an evaluation run leaves behind, and their validation.

results.json has exactly this shape (tables, notebooks and the README numbers all read it):

    {"backbone": str, "routing": str, "sparse": {...},
     "results": [{"task": str, "length": int, "n": int, "score": float, "sparsity": float}, ...],
     "summary": {"score": float, "sparsity": float},
     "provenance": {...}}                                   (optional: files written before it existed lack it)

A row averages the samples of one (task, length) cell: `score` in [0, 1], `sparsity` the mean fraction of layers
routed to sparse attention (Omega_MSR), `n` the number of samples in the cell. `summary` is the n-weighted mean of the
rows, i.e. the mean over all samples. `sparse` is the pattern that ran (its name and parameters).

`provenance` says where the numbers come from, so a table can label a row and a reader can rerun it:

    {"overrides": [str, ...],          the Hydra overrides that define the run (a training job's own, for the
                                        evaluation a training run ends with); the caller's list outside Hydra
     "checkpoint": null | {"source": str, "weights_sha256": str},
                                        the router evaluated: the path or Hub id given, and the sha256 of its
                                        router.safetensors (router.json is left out: attaching this very evaluation
                                        to the router's card rewrites it)
     "seeds": {str: int | null},        e.g. {"eval": the task's data seed, "routing": random plans, "train": ...}
     "task": {...} | null,              the evaluation task's settings (the split: tasks, lengths, n, seed, ...)
     "code": {"commit": str | null, "dirty": bool | null},   git commit of flux's checkout and whether its tree
                                        differed from it (null when unknown, e.g. an installed wheel)
     "flux_version": str | null,
     "date": str}                       ISO 8601 UTC time the evaluation started (a resumed one keeps it)

routing.jsonl has one line per sample: `{"id", "task", "task_type", "length", "decisions", "gates", "score"}` with
`decisions` one 0/1 per layer (1 = SA), `gates` the router's per-layer FA weights or null, and `length` the number
of prompt tokens the model saw; generation tasks add `prediction` (the decoded output) and `answers` (the references
it was scored against), and samples with per-input properties add `meta` (keys in ROUTING_META_KEYS: for a
retrieval sample whose answers sit verbatim in its context, `needle_depth` in [0, 1] = the share of the context's
tokens before the farthest answer the question needs, and `needle_distance_tokens` = the context tokens from that
answer to the end of the context, where the question starts). flux.evaluate appends the lines as samples finish
and rebuilds results.json from them, so the file is also what a resumed evaluation continues from.
Training writes the same lines for its validation passes, with `score` null (no reference answer is scored
there).

bench.json is what `python -m flux.bench` writes (sections env, config, prefill, decode, ...); `read_bench` turns it
into the flat timing rows the figures read: `{"device", "backbone", "dense_backend", "rows": [{"phase", "context",
"batch", "sa_fraction", "ms", "speedup", ...}]}` (a file already in that flat form is read as it is).

This module is the one schema for the three files: flux.evaluate writes through it, flux.viz, the notebooks and
experiments/tables.py read through it.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flux.errors import FluxUserError
from flux.evals.base import TASK_TYPES, EvalSample, EvalTask
from flux.evals.io import existing_file, read_jsonl, read_text

RESULTS_FILE = "results.json"
ROUTING_FILE = "routing.jsonl"
BENCH_FILE = "bench.json"
BENCH_PHASES = ("prefill", "decode")
BENCH_ROW_KEYS = ("phase", "context", "batch", "sa_fraction", "ms", "speedup")
TOP_KEYS = ("backbone", "routing", "sparse", "results", "summary")
TOP_OPTIONAL_KEYS = ("provenance",)
PROVENANCE_KEYS = ("overrides", "checkpoint", "seeds", "task", "code", "flux_version", "date")
CHECKPOINT_KEYS = ("source", "weights_sha256")
CODE_KEYS = ("commit", "dirty")
ROW_KEYS = ("task", "length", "n", "score", "sparsity")
SUMMARY_KEYS = ("score", "sparsity")
ROUTING_KEYS = ("id", "task", "task_type", "length", "decisions", "gates", "score")
ROUTING_OPTIONAL_KEYS = ("prediction", "answers", "meta")
# Per-input properties a routing.jsonl line may carry under "meta" (see the module docstring), with their checks.
ROUTING_META_KEYS = ("needle_depth", "needle_distance_tokens")
SUMMARY_TOL = 1e-6


class ResultsFormatError(FluxUserError):
    """A results.json / routing.jsonl (or in-memory records) that does not have the documented shape."""


@dataclass(frozen=True)
class SampleRecord:
    """One evaluated sample: its results cell (`task`, `length`), score, and routing."""

    id: str
    task: str
    task_type: str
    length: int
    score: float
    decisions: Sequence[bool]
    prompt_tokens: int
    gates: Sequence[float] | None = None
    prediction: str | None = None
    answers: Sequence[str] | None = None
    meta: Mapping[str, Any] | None = None

    @property
    def sparsity(self) -> float:
        return sum(map(bool, self.decisions)) / len(self.decisions)


def make_record(task: EvalTask, sample: EvalSample, prediction: str, decisions: Sequence[bool], prompt_tokens: int,
                gates: Sequence[float] | None = None) -> SampleRecord:
    """Score one generation and file it under the task's results row (the glue of an evaluation loop). The sample's
    per-input properties (ROUTING_META_KEYS found in its meta) go with it."""
    label, length = task.row_key(sample)
    meta = {k: sample.meta[k] for k in ROUTING_META_KEYS if k in sample.meta}
    return SampleRecord(id=sample.id, task=label, task_type=sample.meta["task_type"], length=length,
                        score=task.score(prediction, sample), decisions=decisions, prompt_tokens=prompt_tokens,
                        gates=gates, prediction=prediction, answers=tuple(sample.answers), meta=meta or None)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _fraction(value: Any, what: str, where: str) -> float:
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise ResultsFormatError(f"{where}: {what}={value!r} must be a number in [0, 1]")
    return float(value)


def _check_record(rec: SampleRecord, num_layers: int) -> None:
    where = f"sample {rec.id!r} ({rec.task}, length {rec.length})"
    _fraction(rec.score, "score", where)
    if rec.task_type not in TASK_TYPES:
        raise ResultsFormatError(f"{where}: task_type={rec.task_type!r} must be one of {TASK_TYPES}")
    if len(rec.decisions) != num_layers:
        raise ResultsFormatError(f"{where}: {len(rec.decisions)} layer decisions, but the first sample has "
                                 f"{num_layers}; one run evaluates one backbone")
    if rec.gates is not None and len(rec.gates) != num_layers:
        raise ResultsFormatError(f"{where}: {len(rec.gates)} gates for {num_layers} layers")
    if not _is_count(rec.prompt_tokens, 1):
        raise ResultsFormatError(f"{where}: prompt_tokens={rec.prompt_tokens!r} must be a positive integer")
    if rec.meta:
        _check_routing_meta(rec.meta, where)


def aggregate(records: Iterable[SampleRecord]) -> list[dict[str, Any]]:
    """Results rows, one per (task, length) cell, sorted by task then length."""
    records = list(records)
    if not records:
        raise ResultsFormatError("no sample records to aggregate; the evaluation produced no samples")
    if not records[0].decisions:
        raise ResultsFormatError(f"sample {records[0].id!r}: empty decisions list; give one decision per layer")
    for rec in records:
        _check_record(rec, len(records[0].decisions))
    cells: dict[tuple[str, int], list[SampleRecord]] = defaultdict(list)
    for rec in records:
        cells[(rec.task, rec.length)].append(rec)
    return [
        {"task": task, "length": length, "n": len(cell),
         "score": sum(r.score for r in cell) / len(cell),
         "sparsity": sum(r.sparsity for r in cell) / len(cell)}
        for (task, length), cell in sorted(cells.items())
    ]


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """n-weighted means of the rows' score and sparsity."""
    total = sum(row["n"] for row in rows)
    return {key: sum(row[key] * row["n"] for row in rows) / total for key in SUMMARY_KEYS}


def build_results(backbone: str, routing: str, sparse: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
                  provenance: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The results.json content for `rows` (from `aggregate`, or `PerplexityTask.result_row`), validated;
    `provenance` (see the module docstring) is added when given."""
    results = {"backbone": backbone, "routing": routing, "sparse": dict(sparse),
               "results": [dict(row) for row in rows], "summary": summarize(rows) if rows else {}}
    if provenance is not None:
        results["provenance"] = dict(provenance)
    return validate_results(results, "results")


def _exact_keys(obj: Any, keys: Sequence[str], where: str, optional: Sequence[str] = ()) -> None:
    if not isinstance(obj, Mapping):
        raise ResultsFormatError(f"{where}: expected an object with keys {list(keys)}, got {type(obj).__name__}")
    missing, extra = [k for k in keys if k not in obj], sorted(set(obj) - set(keys) - set(optional))
    if missing or extra:
        raise ResultsFormatError(f"{where}: keys must be exactly {list(keys)}; missing {missing}, unexpected {extra}")


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def validate_provenance(obj: Any, where: str) -> None:
    """Check the `provenance` object of results.json (its shape is in the module docstring)."""
    _exact_keys(obj, PROVENANCE_KEYS, where)
    overrides = obj["overrides"]
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ResultsFormatError(f"{where}: overrides must be a list of strings (Hydra overrides), got {overrides!r}")
    checkpoint = obj["checkpoint"]
    if checkpoint is not None:
        _exact_keys(checkpoint, CHECKPOINT_KEYS, f"{where}.checkpoint")
        if not isinstance(checkpoint["source"], str) or not checkpoint["source"]:
            raise ResultsFormatError(f"{where}.checkpoint: source must be the router's path or Hub id")
        if not _is_sha256(checkpoint["weights_sha256"]):
            raise ResultsFormatError(f"{where}.checkpoint: weights_sha256={checkpoint['weights_sha256']!r} must be "
                                     "64 lowercase hex digits")
    seeds = obj["seeds"]
    if not isinstance(seeds, Mapping) or not all(isinstance(k, str) and (v is None or _is_count(v, 0))
                                                 for k, v in seeds.items()):
        raise ResultsFormatError(f"{where}: seeds must map names to non-negative integers or null, got {seeds!r}")
    if obj["task"] is not None and not isinstance(obj["task"], Mapping):
        raise ResultsFormatError(f"{where}: task must be an object (the evaluation task's settings) or null")
    _exact_keys(obj["code"], CODE_KEYS, f"{where}.code")
    if obj["code"]["commit"] is not None and not isinstance(obj["code"]["commit"], str):
        raise ResultsFormatError(f"{where}.code: commit must be a string or null")
    if obj["code"]["dirty"] is not None and not isinstance(obj["code"]["dirty"], bool):
        raise ResultsFormatError(f"{where}.code: dirty must be true, false or null")
    if obj["flux_version"] is not None and not isinstance(obj["flux_version"], str):
        raise ResultsFormatError(f"{where}: flux_version must be a string or null")
    if not isinstance(obj["date"], str) or not obj["date"]:
        raise ResultsFormatError(f"{where}: date must be an ISO 8601 string")


def validate_results(obj: Any, source: str) -> dict[str, Any]:
    """Check the exact results.json shape and the summary arithmetic; returns `obj` as a dict. Files without
    `provenance` (written before it was recorded) are valid."""
    _exact_keys(obj, TOP_KEYS, source, optional=TOP_OPTIONAL_KEYS)
    if "provenance" in obj:
        validate_provenance(obj["provenance"], f"{source}: provenance")
    for key in ("backbone", "routing"):
        if not isinstance(obj[key], str) or not obj[key]:
            raise ResultsFormatError(f"{source}: {key!r} must be a non-empty string, got {obj[key]!r}")
    if not isinstance(obj["sparse"], Mapping):
        raise ResultsFormatError(f"{source}: 'sparse' must be an object (the pattern config), got {obj['sparse']!r}")
    rows = obj["results"]
    if not isinstance(rows, list) or not rows:
        raise ResultsFormatError(f"{source}: 'results' must be a non-empty list of rows")
    seen: set[tuple[str, int]] = set()
    for i, row in enumerate(rows):
        where = f"{source}: results[{i}]"
        _exact_keys(row, ROW_KEYS, where)
        if not isinstance(row["task"], str) or not row["task"]:
            raise ResultsFormatError(f"{where}: task must be a non-empty string, got {row['task']!r}")
        if not _is_count(row["length"], 0):
            raise ResultsFormatError(f"{where}: length={row['length']!r} must be a non-negative integer")
        if not _is_count(row["n"], 1):
            raise ResultsFormatError(f"{where}: n={row['n']!r} must be a positive integer")
        _fraction(row["score"], "score", where)
        _fraction(row["sparsity"], "sparsity", where)
        key = (row["task"], row["length"])
        if key in seen:
            raise ResultsFormatError(f"{where}: a second row for task {key[0]!r} at length {key[1]}")
        seen.add(key)
    _exact_keys(obj["summary"], SUMMARY_KEYS, f"{source}: summary")
    expected = summarize(rows)
    for key in SUMMARY_KEYS:
        value = _fraction(obj["summary"][key], key, f"{source}: summary")
        if abs(value - expected[key]) > SUMMARY_TOL:
            raise ResultsFormatError(f"{source}: summary.{key}={value} is not the n-weighted mean of the rows "
                                     f"({expected[key]})")
    return dict(obj)


def write_results(results: Mapping[str, Any], *paths: str | Path) -> list[Path]:
    """Validate and write results.json to every path (a file path, or an existing folder that gets results.json)."""
    validate_results(results, "results")
    text = json.dumps(results, indent=2, ensure_ascii=False) + "\n"
    written = []
    for path in paths:
        p = Path(path)
        p = p / RESULTS_FILE if p.is_dir() else p
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
        written.append(p)
    return written


def _read_json(path: str | Path, filename: str, what: str) -> tuple[Path, Any]:
    """(file, parsed content) of a JSON file given as its path or as the folder holding `filename`."""
    p = Path(path)
    p = existing_file(p / filename if p.is_dir() else p, what)
    try:
        return p, json.loads(read_text(p, what))
    except json.JSONDecodeError as err:
        raise ResultsFormatError(f"{p}:{err.lineno}: invalid JSON ({err.msg}); rerun what wrote it") from err


def read_results(path: str | Path) -> dict[str, Any]:
    """Read and validate one results.json (or the results.json of a run folder)."""
    p, obj = _read_json(path, RESULTS_FILE, "results")
    return validate_results(obj, str(p))


def routing_line(rec: SampleRecord) -> dict[str, Any]:
    """One routing.jsonl record (decisions as 0/1, length = prompt tokens, plus prediction and answers if known)."""
    line = {"id": rec.id, "task": rec.task, "task_type": rec.task_type, "length": rec.prompt_tokens,
            "decisions": [int(bool(d)) for d in rec.decisions],
            "gates": None if rec.gates is None else [float(g) for g in rec.gates], "score": float(rec.score)}
    if rec.prediction is not None:
        line["prediction"] = rec.prediction
        line["answers"] = list(rec.answers or ())
    if rec.meta:
        line["meta"] = dict(rec.meta)
    return line


def record_from_line(line: Mapping[str, Any], length: int) -> SampleRecord:
    """The SampleRecord of a routing.jsonl line; `length` is its results row's length (the line keeps the prompt's
    token count, the row key comes from the task)."""
    answers = line.get("answers")
    return SampleRecord(id=line["id"], task=line["task"], task_type=line["task_type"], length=length,
                        score=float(line["score"]), decisions=[bool(d) for d in line["decisions"]],
                        prompt_tokens=int(line["length"]), gates=line["gates"], prediction=line.get("prediction"),
                        answers=None if answers is None else tuple(answers), meta=line.get("meta"))


def write_routing(path: str | Path, records: Iterable[SampleRecord]) -> Path:
    """Write routing.jsonl (a file path, or an existing folder that gets routing.jsonl); records are checked first."""
    records = list(records)
    aggregate(records)  # same checks as the results rows, so both files describe the same samples
    p = Path(path)
    p = p / ROUTING_FILE if p.is_dir() else p
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(json.dumps(routing_line(r), ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return p


def check_routing_record(rec: Any, loc: str) -> None:
    """Check one routing.jsonl record (a parsed line, or a record in memory); `loc` names it in the message."""
    _exact_keys(rec, ROUTING_KEYS, loc, optional=ROUTING_OPTIONAL_KEYS)
    if "prediction" in rec and not isinstance(rec["prediction"], str):
        raise ResultsFormatError(f"{loc}: prediction must be a string, got {type(rec['prediction']).__name__}")
    answers = rec.get("answers", [])
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise ResultsFormatError(f"{loc}: answers must be a list of strings")
    if not isinstance(rec["id"], str) or not isinstance(rec["task"], str) or not rec["task"]:
        raise ResultsFormatError(f"{loc}: id and task must be strings")
    if rec["task_type"] not in TASK_TYPES:
        raise ResultsFormatError(f"{loc}: task_type={rec['task_type']!r} must be one of {TASK_TYPES}")
    if not _is_count(rec["length"], 1):
        raise ResultsFormatError(f"{loc}: length={rec['length']!r} must be a positive token count")
    decisions = rec["decisions"]
    if not isinstance(decisions, list) or not decisions or any(type(d) is not int or d not in (0, 1)
                                                               for d in decisions):
        raise ResultsFormatError(f"{loc}: decisions must be a non-empty list of 0/1 (1 = SA), got {decisions!r:.80}")
    gates = rec["gates"]
    if gates is not None and (not isinstance(gates, list) or len(gates) != len(decisions)):
        raise ResultsFormatError(f"{loc}: gates must be null or one number per layer ({len(decisions)})")
    for g in gates or ():
        _fraction(g, "gate", loc)
    if rec["score"] is not None:  # null: a training-time record, nothing scored
        _fraction(rec["score"], "score", loc)
    if "meta" in rec:
        _check_routing_meta(rec["meta"], loc)


def _check_routing_meta(meta: Any, loc: str) -> None:
    """The per-input properties of a routing line: known keys only, each with its own range."""
    if not isinstance(meta, Mapping):
        raise ResultsFormatError(f"{loc}: meta must be an object of per-input properties, got {meta!r:.80}")
    unknown = sorted(set(meta) - set(ROUTING_META_KEYS))
    if unknown:
        raise ResultsFormatError(f"{loc}: meta has unknown properties {unknown}; known: {list(ROUTING_META_KEYS)}")
    if "needle_depth" in meta:
        _fraction(meta["needle_depth"], "needle_depth", loc)
    if "needle_distance_tokens" in meta and not _is_count(meta["needle_distance_tokens"], 0):
        raise ResultsFormatError(f"{loc}: needle_distance_tokens={meta['needle_distance_tokens']!r} must be a "
                                 "non-negative integer")


def read_routing(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate routing.jsonl (or the routing.jsonl of a run folder); all lines must agree on layers."""
    p = Path(path)
    p = p / ROUTING_FILE if p.is_dir() else p
    out: list[dict[str, Any]] = []
    for loc, rec in read_jsonl(p, "routing"):
        check_routing_record(rec, loc)
        if out and len(rec["decisions"]) != len(out[0]["decisions"]):
            raise ResultsFormatError(f"{loc}: {len(rec['decisions'])} layers, the first line has "
                                     f"{len(out[0]['decisions'])}; one file holds one backbone's run")
        out.append(rec)
    return out


def validate_bench(bench: Any, source: str) -> dict[str, Any]:
    """Check flat bench content: device/backbone strings and a non-empty list of timing rows; returns a dict copy."""
    if not isinstance(bench, Mapping):
        raise ResultsFormatError(f"{source}: expected a JSON object, got {type(bench).__name__}")
    missing = [k for k in ("device", "backbone", "rows") if k not in bench]
    if missing:
        raise ResultsFormatError(f"{source}: missing key(s) {missing}")
    rows = bench["rows"]
    if not isinstance(rows, list) or not rows:
        raise ResultsFormatError(f"{source} has no rows; rerun `python -m flux.bench` on a GPU machine")
    for i, row in enumerate(rows):
        where = f"{source} rows[{i}]"
        if not isinstance(row, Mapping):
            raise ResultsFormatError(f"{where}: expected an object, got {row!r}")
        missing = [k for k in BENCH_ROW_KEYS if k not in row]
        if missing:
            raise ResultsFormatError(f"{where}: missing key(s) {missing}")
        if row["phase"] not in BENCH_PHASES:
            raise ResultsFormatError(f"{where}: phase={row['phase']!r} is not one of {BENCH_PHASES}")
        for key in ("context", "batch"):
            if not _is_count(row[key], 1):
                raise ResultsFormatError(f"{where}: {key}={row[key]!r} must be a positive int")
        _fraction(row["sa_fraction"], "sa_fraction", where)
        for key in ("ms", "speedup"):
            if not _is_number(row[key]) or row[key] <= 0:
                raise ResultsFormatError(f"{where}: {key}={row[key]!r} must be a positive number")
    return dict(bench)


def _generate_rows(rows: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Timing rows from the `generate` section (FluxModel.generate end to end): each router or dense call gives a
    prefill row (time to first token, vs the engine's dense plan) and a decode row (ms per token; speedup = dense
    decode time / this decode time at the same batch). transformers' rows and the fixed-plan comparisons stay in
    bench.json; the max-batch rows answer another question."""
    ok = [r for r in rows if "error" not in r and r.get("plan") in ("dense", "router")
          and r.get("batch_kind", "fixed") == "fixed" and r.get("ttft_ms") and r.get("decode_ms_per_token")]
    out = []
    for r in ok:
        dense = next((d for d in ok if d["plan"] == "dense" and d["length"] == r["length"]
                      and d["batch"] == r["batch"]), None)
        if dense is None:
            continue
        common = {"context": r["length"], "batch": r["batch"], "sa_fraction": r["sa_fraction"],
                  "peak_mem_gb": r.get("peak_gib")}
        out.append({"phase": "prefill", **common, "ms": r["ttft_ms"], "tokens_per_s": None,
                    "speedup": dense["ttft_ms"] / r["ttft_ms"]})
        out.append({"phase": "decode", **common, "ms": r["decode_ms_per_token"], "tokens_per_s": r.get("tokens_per_s"),
                    "speedup": dense["decode_ms_per_token"] / r["decode_ms_per_token"]})
    return out


def bench_rows(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Flatten the sectioned file `python -m flux.bench` writes into timing rows: prefill time to first token, and
    decode time per token at the requested batch. Files from the `generate` section (the engine, end to end) and
    from the earlier `prefill`/`decode` sections (fixed plans) both read."""
    try:
        cfg = raw["config"]["backbone"]
        backbone = cfg if isinstance(cfg, str) else (f"{cfg.get('model_type', 'model')} "
                                                     f"{cfg.get('num_hidden_layers', '?')} layers (random weights)")
        if "generate" in raw:
            return {"device": raw["env"]["gpu"], "backbone": backbone, "dense_backend": "the engine's dense plan",
                    "rows": _generate_rows(raw["generate"]["rows"])}
        rows = [{"phase": "prefill", "context": r["length"], "batch": r["batch"], "sa_fraction": r["sa_fraction"],
                 "ms": r["ttft_ms"], "tokens_per_s": None, "peak_mem_gb": r.get("peak_mem_gib"),
                 "speedup": r["speedup"]} for r in raw["prefill"]]
        rows += [{"phase": "decode", "context": r["length"], "batch": r["batch"], "sa_fraction": r["sa_fraction"],
                  "ms": r["ms_per_token"], "tokens_per_s": r.get("tokens_per_s"), "peak_mem_gb": r.get("peak_mem_gib"),
                  "speedup": r["throughput_vs_dense_same_batch"]}
                 for r in raw["decode"] if r.get("batch_kind", "fixed") == "fixed"]
        return {"device": raw["env"]["gpu"], "backbone": backbone, "dense_backend": "best measured", "rows": rows}
    except (KeyError, TypeError) as err:
        raise ResultsFormatError(f"{source}: not a flux.bench result (missing {err}); rerun `python -m flux.bench`"
                                 ) from None


def read_bench(path: str | Path) -> dict[str, Any]:
    """Read and validate bench.json (or the bench.json of a folder): flux.bench's sectioned file or flat rows."""
    p, raw = _read_json(path, BENCH_FILE, "bench")
    if isinstance(raw, Mapping) and "rows" not in raw and ("prefill" in raw or "generate" in raw):
        raw = bench_rows(raw, str(p))
    return validate_bench(raw, str(p))
