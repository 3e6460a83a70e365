"""results.json aggregation and validation, routing.jsonl round trips (flux.evals.results)."""

from __future__ import annotations

import json

import pytest

from flux.evals.jsonl import JsonlTask
from flux.evals.results import (
    ResultsFormatError,
    SampleRecord,
    aggregate,
    build_results,
    make_record,
    read_results,
    read_routing,
    write_results,
    write_routing,
)


def rec(i: int, task: str, length: int, score: float, decisions: list[int], gates=None) -> SampleRecord:
    return SampleRecord(id=f"s{i}", task=task, task_type="retrieval", length=length, score=score,
                        decisions=[bool(d) for d in decisions], prompt_tokens=length + 20, gates=gates)


RECORDS = [
    rec(0, "ruler/niah_single", 1024, 1.0, [1, 0, 0, 1]),  # sparsity 0.5
    rec(1, "ruler/niah_single", 1024, 0.0, [1, 1, 0, 0]),  # 0.5
    rec(2, "ruler/niah_single", 1024, 1.0, [1, 0, 0, 0]),  # 0.25
    rec(3, "ruler/cwe", 1024, 0.0, [1, 1, 1, 1], gates=[0.1, 0.2, 0.3, 0.4]),  # 1.0
]


def test_aggregate_rows_and_n_weighted_summary():
    rows = aggregate(RECORDS)
    assert rows == [
        {"task": "ruler/cwe", "length": 1024, "n": 1, "score": 0.0, "sparsity": 1.0},
        {"task": "ruler/niah_single", "length": 1024, "n": 3, "score": pytest.approx(2 / 3),
         "sparsity": pytest.approx(1.25 / 3)},
    ]
    results = build_results("HuggingFaceTB/SmolLM2-135M-Instruct", "router",
                            {"pattern": "streaming", "sink": 128, "window": 2048}, rows)
    assert list(results) == ["backbone", "routing", "sparse", "results", "summary"]
    # n-weighted: score (2/3 * 3 + 0) / 4 = 0.5; sparsity (1.25 + 1.0) / 4 = 0.5625 (mean over the 4 samples).
    assert results["summary"] == {"score": pytest.approx(0.5), "sparsity": pytest.approx(0.5625)}
    assert all(list(row) == ["task", "length", "n", "score", "sparsity"] for row in results["results"])


def test_write_read_round_trip_exact_json(tmp_path):
    results = build_results("bb", "dense", {}, aggregate(RECORDS))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    written = write_results(results, run_dir, tmp_path / "copy" / "out.json")
    assert written == [run_dir / "results.json", tmp_path / "copy" / "out.json"]
    raw = json.loads((run_dir / "results.json").read_text())
    assert set(raw) == {"backbone", "routing", "sparse", "results", "summary"}
    assert read_results(run_dir) == raw == read_results(tmp_path / "copy" / "out.json")


def _valid() -> dict:
    return {"backbone": "bb", "routing": "dense", "sparse": {},
            "results": [{"task": "t/a", "length": 0, "n": 1, "score": 1.0, "sparsity": 0.0},
                        {"task": "t/b", "length": 0, "n": 3, "score": 0.0, "sparsity": 0.0}],
            "summary": {"score": 0.25, "sparsity": 0.0}}


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda r: r.update(extra=1), r"keys must be exactly .*unexpected \['extra'\]"),
    (lambda r: r.pop("sparse"), r"missing \['sparse'\]"),
    (lambda r: r["results"][0].update(score=1.5), r"results\[0\]: score=1.5 must be a number in \[0, 1\]"),
    (lambda r: r["results"][1].update(n=0), r"results\[1\]: n=0 must be a positive integer"),
    (lambda r: r["results"][1].update(length=-1), r"length=-1 must be a non-negative integer"),
    (lambda r: r["results"][1].update(task="t/a"), r"a second row for task 't/a' at length 0"),
    (lambda r: r["results"][0].pop("sparsity"), r"results\[0\]: keys must be exactly"),
    (lambda r: r["summary"].update(score=0.5), r"summary.score=0.5 is not the n-weighted mean of the rows \(0.25\)"),
    (lambda r: r.update(results=[]), r"'results' must be a non-empty list"),
    (lambda r: r.update(backbone=""), r"'backbone' must be a non-empty string"),
])
def test_validation_errors(tmp_path, mutate, message):
    results = _valid()
    mutate(results)
    (tmp_path / "results.json").write_text(json.dumps(results))
    with pytest.raises(ResultsFormatError, match=message):
        read_results(tmp_path)


def test_read_results_bad_json_and_missing(tmp_path):
    (tmp_path / "results.json").write_text('{"backbone": "bb",\n "routing": }')
    with pytest.raises(ResultsFormatError, match=r"results.json:2: invalid JSON"):
        read_results(tmp_path / "results.json")
    with pytest.raises(FileNotFoundError, match="file not found"):
        read_results(tmp_path / "elsewhere" / "results.json")


def test_aggregate_rejects_bad_records():
    with pytest.raises(ResultsFormatError, match="no sample records"):
        aggregate([])
    with pytest.raises(ResultsFormatError, match=r"sample 's9' .*: score=2 must be"):
        aggregate([RECORDS[0], rec(9, "t/x", 0, 2, [0, 0, 0, 0])])
    with pytest.raises(ResultsFormatError, match="3 layer decisions, but the first sample has 4"):
        aggregate([RECORDS[0], rec(9, "t/x", 0, 1.0, [0, 0, 0])])
    with pytest.raises(ResultsFormatError, match="task_type='needle' must be one of"):
        aggregate([SampleRecord("s", "t/x", "needle", 0, 1.0, [True], 5)])
    with pytest.raises(ResultsFormatError, match="prompt_tokens=0 must be a positive integer"):
        aggregate([SampleRecord("s", "t/x", "holistic", 0, 1.0, [True], 0)])


def test_routing_round_trip(tmp_path):
    path = write_routing(tmp_path, RECORDS)
    assert path == tmp_path / "routing.jsonl"
    lines = read_routing(tmp_path)
    assert lines[0] == {"id": "s0", "task": "ruler/niah_single", "task_type": "retrieval", "length": 1044,
                        "decisions": [1, 0, 0, 1], "gates": None, "score": 1.0}
    assert lines[3]["gates"] == [0.1, 0.2, 0.3, 0.4]
    assert [line["id"] for line in lines] == ["s0", "s1", "s2", "s3"]


def test_routing_files_are_readable_by_flux_viz(tmp_path):
    from flux.viz import load_results, load_routing

    write_routing(tmp_path, RECORDS)
    write_results(build_results("bb", "router", {}, aggregate(RECORDS)), tmp_path)
    records = load_routing(tmp_path)
    assert [r.sparsity for r in records] == [0.5, 0.5, 0.25, 1.0]
    assert load_results(tmp_path)[0]["summary"]["sparsity"] == pytest.approx(0.5625)


@pytest.mark.parametrize(("line", "message"), [
    ({"decisions": [0, 2]}, r"decisions must be a non-empty list of 0/1"),
    ({"decisions": [True, False]}, r"decisions must be a non-empty list of 0/1"),
    ({"gates": [0.5]}, r"gates must be null or one number per layer \(2\)"),
    ({"gates": [0.5, 1.5]}, r"gate=1.5 must be a number in \[0, 1\]"),
    ({"length": 0}, r"length=0 must be a positive token count"),
    ({"task_type": "needle"}, r"task_type='needle' must be one of"),
    ({"extra": 1}, r"unexpected \['extra'\]"),
])
def test_routing_validation_errors(tmp_path, line, message):
    good = {"id": "a", "task": "t/x", "task_type": "holistic", "length": 10, "decisions": [0, 1], "gates": None,
            "score": 1.0}
    (tmp_path / "routing.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, **line}) + "\n")
    with pytest.raises(ResultsFormatError, match="routing.jsonl:2: .*" + message):
        read_routing(tmp_path)


def test_routing_layer_count_must_agree(tmp_path):
    good = {"id": "a", "task": "t/x", "task_type": "holistic", "length": 10, "decisions": [0, 1], "gates": None,
            "score": 1.0}
    (tmp_path / "r.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, "decisions": [0, 1, 1]}) + "\n")
    with pytest.raises(ResultsFormatError, match=r"r.jsonl:2: 3 layers, the first line has 2"):
        read_routing(tmp_path / "r.jsonl")


def test_make_record_scores_and_files_a_generation(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"context": "c", "question": "q", "answers": ["Oslo"], "id": "x"}) + "\n")
    task = JsonlTask(str(path))
    (sample,) = task.samples()
    record = make_record(task, sample, "It is oslo.", [False, True], prompt_tokens=12, gates=[0.9, 0.2])
    assert record == SampleRecord("x", "jsonl/qa", "retrieval", 0, 1.0, [False, True], 12, [0.9, 0.2],
                                  prediction="It is oslo.", answers=("Oslo",))


PROVENANCE = {"overrides": ["+experiment=ablation_base", "objective.target=0.3"],
              "checkpoint": {"source": "runs/0/router", "weights_sha256": "ab" * 32},
              "seeds": {"eval": 7, "train": 0}, "task": {"name": "ruler", "n": 20},
              "code": {"commit": "c" * 40, "dirty": False}, "flux_version": "0.1.0", "date": "2026-12-01T09:30:00Z"}


def test_provenance_round_trips_and_files_without_it_still_read(tmp_path):
    with_it = build_results("bb", "router", {}, aggregate(RECORDS), provenance=PROVENANCE)
    assert list(with_it) == ["backbone", "routing", "sparse", "results", "summary", "provenance"]
    write_results(with_it, tmp_path)
    assert read_results(tmp_path)["provenance"] == PROVENANCE
    old = build_results("bb", "router", {}, aggregate(RECORDS))  # a file written before provenance existed
    assert "provenance" not in old
    write_results(old, tmp_path)
    assert read_results(tmp_path) == old


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda p: p.pop("date"), r"provenance: keys must be exactly .*missing \['date'\]"),
    (lambda p: p.update(overrides="a=1"), r"overrides must be a list of strings"),
    (lambda p: p["checkpoint"].update(weights_sha256="xyz"), r"weights_sha256='xyz' must be 64 lowercase hex"),
    (lambda p: p["checkpoint"].pop("source"), r"provenance.checkpoint: keys must be exactly"),
    (lambda p: p.update(seeds={"eval": -1}), r"seeds must map names to non-negative integers or null"),
    (lambda p: p["code"].update(dirty="yes"), r"dirty must be true, false or null"),
    (lambda p: p.update(task=[1]), r"task must be an object"),
])
def test_provenance_validation_errors(tmp_path, mutate, message):
    prov = json.loads(json.dumps(PROVENANCE))
    mutate(prov)
    results = {**_valid(), "provenance": prov}
    (tmp_path / "results.json").write_text(json.dumps(results))
    with pytest.raises(ResultsFormatError, match=message):
        read_results(tmp_path)


def test_routing_meta_round_trips_and_is_checked(tmp_path):
    import dataclasses

    placed = dataclasses.replace(RECORDS[0], meta={"needle_depth": 0.25, "needle_distance_tokens": 700})
    write_routing(tmp_path, [placed, *RECORDS[1:]])
    lines = read_routing(tmp_path)
    assert lines[0]["meta"] == {"needle_depth": 0.25, "needle_distance_tokens": 700} and "meta" not in lines[1]
    good = {"id": "a", "task": "t/x", "task_type": "retrieval", "length": 10, "decisions": [0, 1], "gates": None,
            "score": 1.0}
    for meta, message in [({"depth": 0.5}, r"meta has unknown properties \['depth'\]"),
                          ({"needle_depth": 1.5}, r"needle_depth=1.5 must be a number in \[0, 1\]"),
                          ({"needle_distance_tokens": -3}, r"needle_distance_tokens=-3 must be a non-negative"),
                          ([1], r"meta must be an object")]:
        (tmp_path / "bad.jsonl").write_text(json.dumps({**good, "meta": meta}) + "\n")
        with pytest.raises(ResultsFormatError, match=message):
            read_routing(tmp_path / "bad.jsonl")
    with pytest.raises(ResultsFormatError, match="unknown properties"):
        aggregate([dataclasses.replace(RECORDS[0], meta={"depth": 0.5})])
