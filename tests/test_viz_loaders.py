"""flux.viz loaders: round trips of the output formats, and one clear message for each kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import viz_fixtures as fx

from flux import viz


def _record(decisions: list[int], task: str = "qa", gates: list[float] | None = None, **extra: object) -> dict:
    return {"id": "s0", "task": task, "task_type": "retrieval", "length": 128, "decisions": decisions,
            "gates": gates, "score": 1.0, **extra}


def test_load_routing_reads_records_and_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "routing.jsonl"
    path.write_text(json.dumps(_record([0, 1, 1], gates=[0.9, 0.2, 0.1])) + "\n\n"
                    + json.dumps(_record([1, 1, 1], task="sum")) + "\n", encoding="utf-8")
    records = viz.load_routing(tmp_path, num_layers=3)
    assert [r.task for r in records] == ["qa", "sum"]
    assert records[0].decisions == (0, 1, 1)
    assert records[0].sparsity == pytest.approx(2 / 3)
    np.testing.assert_allclose(records[0].fa_probability(), [0.9, 0.2, 0.1])
    np.testing.assert_allclose(records[1].fa_probability(), [0.0, 0.0, 0.0])


def test_load_routing_missing_file_names_path_and_producer(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"routing\.jsonl not found; it is written by `python -m flux\.evaluate`"):
        viz.load_routing(tmp_path / "run" / "routing.jsonl")


def test_load_routing_rejects_records_with_differing_layer_counts(tmp_path: Path) -> None:
    path = fx.write_jsonl(tmp_path / "routing.jsonl", [_record([0, 1, 1]), _record([0, 1])])
    with pytest.raises(ValueError, match=r"routing\.jsonl:2: 2 layers, the first line has 3"):
        viz.load_routing(path)


def test_load_routing_rejects_other_backbone_layer_count(tmp_path: Path) -> None:
    path = fx.write_jsonl(tmp_path / "routing.jsonl", fx.routing_records("router", num_layers=6))
    with pytest.raises(ValueError, match=r"records have 6 layers but num_layers=30 was expected"):
        viz.load_routing(path, num_layers=30)


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", r"routing\.jsonl:1: invalid JSON"),
    (json.dumps(_record([0, 2])), r"decisions must be a non-empty list of 0/1 \(1 = SA\)"),
    (json.dumps(_record([0, 1], gates=[0.5])), r"gates must be null or one number per layer \(2\)"),
    (json.dumps(_record([0, 1], gates=[0.5, 1.5])), r"gate=1\.5 must be a number in \[0, 1\]"),
    (json.dumps(_record([0, 1], task_type="math")), r"task_type='math' must be one of"),
    (json.dumps({"id": "x", "task": "qa"}),
     r"missing \['task_type', 'length', 'decisions', 'gates', 'score'\]"),
])
def test_load_routing_rejects_malformed_lines(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "routing.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(viz.INPUT_ERRORS, match=message):
        viz.load_routing(path)


def test_load_routing_rejects_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "routing.jsonl"
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no records"):
        viz.load_routing(path)


def test_as_records_validates_in_memory_dicts() -> None:
    records = viz.as_records([_record([0, 1]), _record([1, 1])], num_layers=2)
    assert [r.sparsity for r in records] == [0.5, 1.0]
    with pytest.raises(ValueError, match="no routing records"):
        viz.as_records([])


def test_load_results_finds_every_run_of_a_sweep(tmp_path: Path) -> None:
    root = fx.write_example_run(tmp_path / "run", num_layers=4)
    runs = viz.load_results(root)
    assert [r["routing"] for r in runs] == sorted(fx.ROUTINGS)
    dense = next(r for r in runs if r["routing"] == "dense")
    assert dense["summary"]["sparsity"] == 0.0
    assert dense["source"] == str(root / "dense" / "results.json")
    assert len(viz.load_results(root / "sparse" / "results.json")) == 1


def test_load_results_rejects_empty_results(tmp_path: Path) -> None:
    run = fx.results_from("router", fx.routing_records("router", num_layers=4)) | {"results": []}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(run), encoding="utf-8")
    with pytest.raises(ValueError, match=r"results\.json: 'results' must be a non-empty list of rows"):
        viz.load_results(path)


def test_load_results_missing_folder_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere not found; it is written by `python -m flux\.evaluate`"):
        viz.load_results(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"no results\.json under"):
        viz.load_results(tmp_path)


def test_load_results_rejects_score_outside_unit_range(tmp_path: Path) -> None:
    run = fx.results_from("dense", fx.routing_records("dense", num_layers=4))
    run["results"][1]["score"] = 87.5
    (tmp_path / "results.json").write_text(json.dumps(run), encoding="utf-8")
    with pytest.raises(ValueError, match=r"results\[1\]: score=87\.5 must be a number in \[0, 1\]"):
        viz.load_results(tmp_path)


def test_load_bench_round_trip_and_errors(tmp_path: Path) -> None:
    (tmp_path / "bench.json").write_text(json.dumps(fx.bench()), encoding="utf-8")
    bench = viz.load_bench(tmp_path)
    assert len(bench["rows"]) == 2 * len(fx.BENCH_CONTEXTS) * len(fx.BENCH_FRACTIONS)
    (tmp_path / "bench.json").write_text(json.dumps(fx.bench() | {"rows": []}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"has no rows; rerun `python -m flux\.bench`"):
        viz.load_bench(tmp_path)
    bad = fx.bench()
    bad["rows"][0]["phase"] = "train"
    (tmp_path / "bench.json").write_text(json.dumps(bad), encoding="utf-8")
    with pytest.raises(ValueError, match=r"rows\[0\]: phase='train' is not one of"):
        viz.load_bench(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"bench\.json not found"):
        viz.load_bench(tmp_path / "other" / "bench.json")


def test_load_metrics_skips_empty_cells_per_column(tmp_path: Path) -> None:
    path = fx.write_metrics(tmp_path / "metrics.csv", steps=20, val_every=10)
    metrics = viz.load_metrics(path)
    steps, values = metrics["val/loss"]
    np.testing.assert_array_equal(steps, [9, 19])
    np.testing.assert_allclose(values, [2.5 - 9 / 19, 1.5])
    steps, values = metrics["train/tau"]
    assert len(steps) == 20
    assert values[0] == 1.5 and values[-1] == pytest.approx(0.5)
    assert "step" not in metrics and "epoch" not in metrics


def test_load_metrics_errors(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,train/loss\n0,1.0\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no 'step' column"):
        viz.load_metrics(path)
    path.write_text("step,train/loss\n0,1.0\n1,nan?\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 3: train/loss='nan\?' is not a number"):
        viz.load_metrics(path)
    path.write_text("step,train/loss\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no logged values"):
        viz.load_metrics(path)
    with pytest.raises(FileNotFoundError, match=r"metrics\.csv not found"):
        viz.load_metrics(tmp_path / "run" / "metrics.csv")


def test_find_run_files_picks_the_router_then_the_last_validation_pass(tmp_path: Path) -> None:
    root = fx.write_example_run(tmp_path / "sweep", num_layers=4)  # dense/, router/, ... with results and routing
    for step in (10, 20):
        fx.write_jsonl(root / "train" / "routing_maps" / f"val_step{step:06d}.routing.jsonl",
                       fx.routing_records("router", num_layers=4))
    files = viz.find_run_files(root)
    assert len(files.results) == len(fx.ROUTINGS) and len(files.routing) == len(fx.ROUTINGS) + 2
    assert files.routing_file() == root / "router" / "routing.jsonl"  # an evaluated router first
    (root / "router" / "results.json").write_text("{broken", encoding="utf-8")  # reported by load_results instead
    assert files.routing_file() == root / "train" / "routing_maps" / "val_step000020.routing.jsonl"
    assert viz.find_run_files(root / "dense").routing_file() == root / "dense" / "routing.jsonl"
    assert files.metrics_file() == root / "metrics.csv" and files.bench_file() == root / "bench.json"


def test_find_run_files_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"run folder .*nowhere not found"):
        viz.find_run_files(tmp_path / "nowhere")
    files = viz.find_run_files(tmp_path)
    for pick, message in ((files.routing_file, "no routing.jsonl under"), (files.metrics_file, "no metrics.csv under"),
                          (files.bench_file, "no bench.json under")):
        with pytest.raises(viz.VizFileNotFoundError, match=message):
            pick()


def test_generate_section_bench_reads_and_plots() -> None:
    """A bench.json from the engine's `generate` section (the committed H200 run) flattens into prefill and decode
    rows against the engine's dense plan, and the speed figure draws from it."""
    path = Path(__file__).resolve().parents[1] / "experiments" / "speed" / "h200_engine_v1" / "a"
    bench = viz.load_bench(path)
    phases = {(r["phase"], r["context"], r["batch"]) for r in bench["rows"]}
    assert ("prefill", 131072, 1) in phases and ("decode", 32768, 8) in phases
    dense = [r for r in bench["rows"] if r["sa_fraction"] == 0.0]
    assert dense and all(r["speedup"] == 1.0 for r in dense)
    assert max(r["speedup"] for r in bench["rows"] if r["phase"] == "prefill") > 2.5  # all-SA at 128k
    assert viz.speedup_vs_length(bench).axes
