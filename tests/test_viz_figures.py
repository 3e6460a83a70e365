"""flux.viz figures: what each one draws, checked against hand-computed data on small inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pytest
import viz_fixtures as fx
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from flux import viz
from flux.evals.results import summarize


def _rec(sample_id: str, task: str, decisions: list[int], gates: list[float] | None = None,
         length: int = 100) -> dict[str, Any]:
    return {"id": sample_id, "task": task, "task_type": "retrieval", "length": length, "decisions": decisions,
            "gates": gates, "score": None}


def _run(routing: str, sparsity: float = 0.0, score: float = 0.0, rows: list[dict] | None = None,
         source: str | None = None) -> dict[str, Any]:
    """One run in the results.json schema: a single row at (sparsity, score), or the given rows."""
    rows = rows or [{"task": "qa", "length": 100, "n": 1, "score": score, "sparsity": sparsity}]
    run = {"backbone": "test", "routing": routing, "sparse": {"pattern": "streaming", "sink": 4, "window": 8},
           "results": rows, "summary": summarize(rows)}
    return run | ({"source": source} if source else {})


def _legend_texts(fig: Figure) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def test_routing_heatmap_groups_samples_by_task() -> None:
    records = [_rec("b1", "beta", [1, 0, 0]), _rec("a1", "alpha", [0, 1, 1], length=200),
               _rec("a0", "alpha", [0, 0, 1], length=50), _rec("b0", "beta", [1, 1, 0])]
    fig = viz.routing_heatmap(records, num_layers=3)
    assert isinstance(fig, Figure)
    bar_ax, map_ax = fig.axes
    grid = map_ax.images[0].get_array()
    assert grid.shape == (3, 4)
    # alpha by length (a0 then a1), then beta by id (b0 then b1); columns are samples, rows layers.
    np.testing.assert_array_equal(grid, [[0, 0, 1, 1], [0, 1, 1, 0], [1, 1, 0, 0]])
    np.testing.assert_array_equal(bar_ax.images[0].get_array(), [[0, 0, 1, 1]])
    image = map_ax.images[0]
    assert image.cmap(image.norm(0)) == to_rgba(viz.FA_COLOR)
    assert image.cmap(image.norm(1)) == to_rgba(viz.SA_COLOR)
    assert _legend_texts(fig) == ["FA (full)", "SA (sparse)", "alpha", "beta"]
    assert "SA fraction 50%" in fig.get_suptitle()
    # one x tick per task block, at its centre, named with its sample count; every layer labelled
    assert list(map_ax.get_xticks()) == [0.5, 2.5]
    assert [t.get_text() for t in map_ax.get_xticklabels()] == ["alpha (2)", "beta (2)"]
    assert list(map_ax.get_yticks()) == [0, 1, 2]


def test_routing_heatmap_on_fixture_file_has_layers_by_samples(tmp_path: Path) -> None:
    path = fx.write_jsonl(tmp_path / "routing.jsonl", fx.routing_records("router", num_layers=30, per_cell=2))
    fig = viz.routing_heatmap(viz.load_routing(path, num_layers=30))
    assert fig.axes[1].images[0].get_array().shape == (30, len(fx.TASKS) * len(fx.LENGTHS) * 2)
    assert list(fig.axes[1].get_yticks()) == list(range(30))
    deep = viz.routing_heatmap(fx.routing_records("router", num_layers=80, per_cell=1))
    assert list(deep.axes[1].get_yticks()) == list(range(0, 80, 5))  # about 16 labels for a deep model


def test_routing_heatmap_rejects_wrong_layer_count() -> None:
    with pytest.raises(ValueError, match="record 1: has 2 layers but the first record"):
        viz.routing_heatmap([_rec("a", "t", [0, 1, 1]), _rec("b", "t", [0, 1])])


def test_layer_fa_probability_uses_gates_then_decisions() -> None:
    records = [_rec("a0", "a", [0, 0, 1], gates=[1.0, 0.5, 0.0]), _rec("a1", "a", [1, 0, 0], gates=[0.0, 0.5, 1.0]),
               _rec("b0", "b", [1, 0, 0]), _rec("b1", "b", [1, 1, 0])]
    fig = viz.layer_fa_probability(records)
    (ax,) = fig.axes
    lines = {line.get_label(): line.get_ydata() for line in ax.get_lines()}
    np.testing.assert_allclose(lines["a (n=2)"], [0.5, 0.5, 0.5])
    np.testing.assert_allclose(lines["b (n=2)"], [0.0, 0.5, 1.0])
    np.testing.assert_allclose(lines["all samples (decisions)"], [0.25, 0.75, 0.75])
    assert "from decisions / gates" in ax.get_title()


def test_sparsity_distribution_points_are_per_sample_sparsity() -> None:
    records = [_rec("a0", "a", [0, 0, 1, 1], length=10), _rec("a1", "a", [1, 1, 1, 1], length=20),
               _rec("b0", "b", [0, 0, 0, 1], length=10)]
    fig = viz.sparsity_distribution(records)
    task_ax, length_ax = fig.axes
    by_task = [sorted(c.get_offsets()[:, 1]) for c in task_ax.collections]
    assert by_task == [[0.5, 1.0], [0.25]]
    by_length = [sorted(c.get_offsets()[:, 1]) for c in length_ax.collections]
    assert by_length == [[0.25, 0.5], [1.0]]
    assert [t.get_text() for t in length_ax.get_xticklabels()] == ["10\n(n=2)", "20\n(n=1)"]


def test_length_buckets_group_many_prompt_lengths_by_powers_of_two() -> None:
    # prompts of 1k / 4k / 8k evaluation cells are a few tokens short of their cell's length
    lengths = [1000, 1010, 1020, 3919, 3990, 4000, 4096, 8100, 8190]
    assert viz.length_buckets(lengths) == [(512, 1024, "512–1k"), (2048, 4096, "2k–4k"), (4096, 8192, "4k–8k")]
    records = [_rec(f"s{i}", "a", [int(i % 2 == 0), 1], length=n) for i, n in enumerate(lengths)]
    length_ax = viz.sparsity_distribution(records).axes[1]
    assert [t.get_text() for t in length_ax.get_xticklabels()] == ["512–1k\n(n=3)", "2k–4k\n(n=4)", "4k–8k\n(n=2)"]
    by_bucket = [sorted(c.get_offsets()[:, 1]) for c in length_ax.collections]
    assert by_bucket == [[0.5, 1.0, 1.0], [0.5, 0.5, 1.0, 1.0], [0.5, 1.0]]
    assert viz.length_buckets([7, 9, 9]) == [(6, 7, "7"), (8, 9, "9")]  # few lengths: one box each


def _run_points(ax):
    """The scatter collections of the runs (not the rings around the Pareto front's points)."""
    return [c for c in ax.collections if c.get_gid() != viz.PARETO_RING]


def _placed(sample_id: str, task: str, decisions: list[int], distance: int | None) -> dict[str, Any]:
    rec = _rec(sample_id, task, decisions)
    return rec | ({"meta": {"needle_depth": 0.5, "needle_distance_tokens": distance}} if distance is not None else {})


def test_per_input_stats_hand_computed() -> None:
    records = [_placed("a", "niah", [1, 1, 0, 0], 50), _placed("b", "niah", [1, 0, 0, 0], 300),
               _placed("c", "niah", [0, 0, 0, 0], 900), _placed("d", "niah", [1, 0, 0, 0], None),
               _placed("e", "cwe", [1, 1, 1, 0], None), _placed("f", "cwe", [1, 1, 1, 0], None)]
    niah, cwe = sorted(viz.per_input_stats(records), key=lambda s: s["task"], reverse=True)
    # niah: Ω 0.5, 0.25, 0, 0.25 -> mean 0.25, std sqrt(0.125 / 4); plans {1100, 1000, 0000}; the three placed
    # samples fall in Ω as the distance grows: rho = -1
    assert (niah["n"], niah["distinct_plans"], niah["with_prop"]) == (4, 3, 3)
    assert niah["omega_mean"] == pytest.approx(0.25) and niah["omega_std"] == pytest.approx((0.125 / 4) ** 0.5)
    assert niah["spearman"] == pytest.approx(-1.0)
    assert (cwe["n"], cwe["distinct_plans"], cwe["omega_std"], cwe["spearman"]) == (2, 1, 0.0, None)
    assert viz.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert viz.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(np.corrcoef([0, 1.5, 1.5, 3], [0, 1, 2, 3])[0, 1])
    with pytest.raises(ValueError, match=r"prop='depth' is not a per-input property of routing.jsonl"):
        viz.per_input_stats(records, prop="depth")


def test_context_awareness_draws_omega_per_input_and_against_the_answer_distance(tmp_path: Path) -> None:
    records = viz.load_routing(fx.write_example_run(tmp_path, num_layers=6) / "router")
    fig = viz.context_awareness(records, window=64)
    spread_ax, prop_ax = fig.axes
    stats = viz.per_input_stats(records)
    assert [t.get_text() for t in spread_ax.get_xticklabels()] == [
        f"{s['task']}\n{s['distinct_plans']} plan{'s' if s['distinct_plans'] != 1 else ''} / {s['n']}" for s in stats]
    placed = [r for r in records if "needle_distance_tokens" in r.meta]
    assert placed and {r.task_type for r in placed} == {"retrieval"}
    drawn = np.concatenate([c.get_offsets() for c in prop_ax.collections])
    expected = sorted((r.meta["needle_distance_tokens"], r.sparsity) for r in placed)
    np.testing.assert_allclose(sorted(map(tuple, drawn)), expected)
    (window,) = [line for line in prop_ax.get_lines() if line.get_label() == "sparse window (64)"]
    assert list(window.get_xdata()) == [64, 64]
    legend = [t.get_text() for t in prop_ax.get_legend().get_texts()]
    assert any(t.startswith("niah_single (n=6, ρ=") for t in legend)
    unplaced = [r for r in records if r.task_type == "holistic"]
    empty = viz.context_awareness(unplaced, window=64).axes[1]
    assert not empty.collections and "no sample records needle_distance_tokens" in empty.texts[0].get_text()


def test_pareto_front_hand_example() -> None:
    points = [(0.0, 0.9), (0.5, 0.8), (0.5, 0.7), (1.0, 0.5), (0.3, 0.6)]
    assert viz.pareto_front(points) == [0, 1, 3]


def test_quality_vs_sparsity_labels_every_run_and_draws_the_front(tmp_path: Path) -> None:
    runs = viz.load_results(fx.write_example_run(tmp_path, num_layers=6))
    fig = viz.quality_vs_sparsity(runs)
    (ax,) = fig.axes
    assert len(_run_points(ax)) == len(fx.ROUTINGS)
    assert sorted(t.get_text() for t in ax.texts) == sorted(fx.ROUTINGS)
    points = [(r["summary"]["sparsity"], r["summary"]["score"]) for r in runs]
    front = next(line for line in ax.get_lines() if line.get_label() == "Pareto front")
    np.testing.assert_allclose(front.get_xdata(), [points[i][0] for i in viz.pareto_front(points)])
    (ring,) = [c for c in ax.collections if c.get_gid() == viz.PARETO_RING]  # the front's points are ringed
    np.testing.assert_allclose(ring.get_offsets(), [points[i] for i in viz.pareto_front(points)])
    # every routing is a legend entry with its own marker, so baselines are told apart from routers
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert set(fx.ROUTINGS) <= set(legend) and "Pareto front" in legend
    dense_score = next(r["summary"]["score"] for r in runs if r["routing"] == "dense")
    dense_line = next(line for line in ax.get_lines() if line.get_label() == "dense score")
    np.testing.assert_allclose(dense_line.get_ydata(), [dense_score, dense_score])


def test_quality_vs_sparsity_tells_same_routing_runs_apart_and_plots_one_task() -> None:
    rows = [{"task": "qa", "length": 1, "n": 1, "score": 1.0, "sparsity": 0.0},
            {"task": "qa", "length": 2, "n": 3, "score": 0.0, "sparsity": 1.0},
            {"task": "sum", "length": 1, "n": 1, "score": 0.5, "sparsity": 0.5}]
    runs = [_run("router", rows=rows, source="sweep/t03/results.json"),
            _run("router", rows=rows, source="sweep/t05/results.json")]
    fig = viz.quality_vs_sparsity(runs, task="qa")
    (ax,) = fig.axes
    assert sorted(t.get_text() for t in ax.texts) == ["router (t03)", "router (t05)"]
    np.testing.assert_allclose(_run_points(ax)[0].get_offsets(), [[0.75, 0.25]])
    labelled = viz.quality_vs_sparsity(runs, labels=["target=0.3", "target=0.5"])  # e.g. a sweep's swept values
    assert sorted(t.get_text() for t in labelled.axes[0].texts) == ["target=0.3", "target=0.5"]
    with pytest.raises(ValueError, match="labels has 1 entries for 2 runs"):
        viz.quality_vs_sparsity(runs, labels=["one"])
    assert ax.get_ylabel() == "score (qa)"
    with pytest.raises(ValueError, match=r"no results for task='math'; tasks there: \['qa', 'sum'\]"):
        viz.quality_vs_sparsity(runs, task="math")
    with pytest.raises(ValueError, match="results_list is empty"):
        viz.quality_vs_sparsity([])


def test_speedup_vs_length_one_line_per_sa_fraction() -> None:
    bench = fx.bench()
    fig = viz.speedup_vs_length(bench)
    assert [ax.get_title() for ax in fig.axes] == ["prefill", "decode"]
    for ax in fig.axes:
        lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
        assert sorted(lines) == ["SA 0%", "SA 100%", "SA 50%"]
        np.testing.assert_array_equal(lines["SA 100%"].get_xdata(), fx.BENCH_CONTEXTS)
        expected = [1.0 + np.log2(c / 512) * 0.3 for c in fx.BENCH_CONTEXTS]
        np.testing.assert_allclose(lines["SA 100%"].get_ydata(), expected)
        np.testing.assert_allclose(lines["SA 0%"].get_ydata(), [1.0] * len(fx.BENCH_CONTEXTS))


def test_speedup_vs_length_batches_get_line_styles_and_missing_phase_is_said() -> None:
    fig = viz.speedup_vs_length(fx.bench(batches=(1, 4)))
    lines = {line.get_label(): line for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")}
    assert len(lines) == 2 * len(fx.BENCH_FRACTIONS)
    assert lines["SA 50%, batch 1"].get_linestyle() == "-"
    assert lines["SA 50%, batch 4"].get_linestyle() == "--"
    prefill_only = fx.bench()
    prefill_only["rows"] = [r for r in prefill_only["rows"] if r["phase"] == "prefill"]
    fig = viz.speedup_vs_length(prefill_only)
    assert [t.get_text() for t in fig.axes[1].texts] == ["no decode rows in bench.json"]


def test_training_curves_panels(tmp_path: Path) -> None:
    metrics = viz.load_metrics(fx.write_metrics(tmp_path / "metrics.csv"))
    fig = viz.training_curves(metrics)
    labels = [[line.get_label() for line in ax.get_lines()] for ax in fig.axes]
    assert labels == [["total", "LM", "KL (distill)"],
                      ["soft", "hard", "target", "kv_retrieval", "niah_single", "summary"],
                      ["τ"], ["λ1", "λ2"]]
    np.testing.assert_allclose(fig.axes[2].get_lines()[0].get_ydata(), metrics["train/tau"][1])


def test_training_curves_accepts_step_suffix_and_marks_missing_panels() -> None:
    steps = np.arange(3.0)
    fig = viz.training_curves({"train/tau_step": (steps, np.array([1.5, 1.0, 0.5]))})
    assert [line.get_label() for line in fig.axes[2].get_lines()] == ["τ"]
    assert [t.get_text() for t in fig.axes[3].texts] == ["not logged"]
    with pytest.raises(ValueError, match="metrics hold none of the training columns"):
        viz.training_curves({"val/loss": (steps, steps)})


def test_task_colours_never_reuse_fa_or_sa_colours() -> None:
    colors = viz.task_colors(f"task{i}" for i in range(16))
    reserved = {to_rgba(viz.FA_COLOR), to_rgba(viz.SA_COLOR), to_rgba("tab:blue"), to_rgba("tab:orange")}
    assert len(set(colors.values())) == 16
    assert not {to_rgba(c) for c in colors.values()} & reserved
    assert viz.task_colors(["b", "a"]) == viz.task_colors(["a", "b", "a"])


def test_save_figure_writes_png_and_leaves_rcparams_alone(tmp_path: Path) -> None:
    before = dict(matplotlib.rcParams)
    fig = viz.routing_heatmap([_rec("a", "t", [0, 1])])
    path = viz.save_figure(fig, tmp_path / "maps" / "routing.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert dict(matplotlib.rcParams) == before
    with pytest.raises(ValueError, match=r"use a path ending in \.png"):
        viz.save_figure(fig, tmp_path / "routing.pdf")
