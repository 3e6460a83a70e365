"""experiments/tables.py on hand-made results.json files, checked against hand-computed table cells."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "tables.py"


def _load_tables_module():
    spec = importlib.util.spec_from_file_location("flux_experiments_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is executing
    spec.loader.exec_module(module)
    return module


tables = _load_tables_module()


def row(task: str, length: int, n: int, score: float, sparsity: float) -> dict:
    return {"task": task, "length": length, "n": n, "score": score, "sparsity": sparsity}


def write_run(path: Path, routing: str, rows: list[dict], sparse: dict | None = None,
              provenance: dict | None = None) -> Path:
    total = sum(r["n"] for r in rows)
    summary = {k: sum(r[k] * r["n"] for r in rows) / total for k in ("score", "sparsity")}
    path.mkdir(parents=True, exist_ok=True)
    results = {"backbone": "bb", "routing": routing, "sparse": sparse or {"pattern": "streaming", "window": 2048},
               "results": rows, "summary": summary}
    if provenance is not None:
        results["provenance"] = provenance
    (path / "results.json").write_text(json.dumps(results), encoding="utf-8")
    return path / "results.json"


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    write_run(root / "dense_ruler", "dense", [
        row("ruler/niah_single", 1024, 2, 1.0, 0.0), row("ruler/niah_single", 2048, 2, 0.5, 0.0),
        row("ruler/cwe", 1024, 2, 0.5, 0.0), row("ruler/cwe", 2048, 2, 0.0, 0.0)])
    write_run(root / "router_ruler", "router", [
        row("ruler/niah_single", 1024, 2, 1.0, 0.25), row("ruler/niah_single", 2048, 2, 1.0, 0.5),
        row("ruler/cwe", 1024, 2, 0.5, 0.75), row("ruler/cwe", 2048, 2, 0.5, 0.5)])
    write_run(root / "static_ruler", "static", [
        row("ruler/niah_single", 1024, 2, 0.5, 0.5), row("ruler/niah_single", 2048, 2, 0.0, 0.5),
        row("ruler/cwe", 1024, 2, 0.0, 0.5), row("ruler/cwe", 2048, 2, 0.0, 0.5)])
    write_run(root / "static_lbe", "static", [
        row("longbench_e/qasper", 0, 4, 0.5, 0.5), row("longbench_e/qasper", 4000, 2, 0.2, 0.5),
        row("longbench_e/gov_report", 0, 2, 0.3, 0.5), row("longbench_e/trec", 8000, 1, 1.0, 0.5)])
    write_run(root / "dense_v2", "dense", [
        row("longbench_v2/easy", 0, 2, 1.0, 0.0), row("longbench_v2/hard", 0, 2, 0.5, 0.0),
        row("longbench_v2/hard", 128000, 4, 0.25, 0.0)])
    write_run(root / "random_math", "random", [row("math/aime", 0, 2, 0.0, 0.4), row("math/gsm8k", 0, 4, 0.5, 0.4)])
    return root


def _table(built, name):
    return next(t for t in built if t.name == name)


def test_tables_hand_computed(sweep):
    methods = tables.group_methods([dict(tables.read_results(p), source=str(p))
                                    for p in tables.find_results([str(sweep)])])
    assert [m.label for m in methods] == ["Dense (all FA)", "Router", "Static (Ω=0.50)", "Random (Ω=0.40)"]
    built = tables.build_tables(methods)
    assert [t.name for t in built] == ["ruler_by_type", "ruler_by_length", "ruler_by_task", "longbench_e_by_category",
                                       "longbench_e_by_length", "longbench_v2", "math"]

    # niah_single is a retrieval task, cwe a holistic one: score and Ω per type, sample-weighted over the lengths
    by_type = _table(built, "ruler_by_type")
    assert by_type.columns == ["retrieval", "holistic", "Avg", "Ω retrieval", "Ω holistic"]
    assert by_type.rows == [("Dense (all FA)", [75.0, 25.0, 50.0, 0.0, 0.0], 0.0),
                            ("Router", [100.0, 50.0, 75.0, 37.5, 62.5], 0.5),
                            ("Static (Ω=0.50)", [25.0, 0.0, 12.5, 50.0, 50.0], 0.5)]

    ruler = _table(built, "ruler_by_length")
    assert ruler.columns == ["1k", "2k", "Avg"]
    assert ruler.rows == [("Dense (all FA)", [75.0, 25.0, 50.0], 0.0), ("Router", [75.0, 75.0, 75.0], 0.5),
                          ("Static (Ω=0.50)", [25.0, 0.0, 12.5], 0.5)]
    assert _table(built, "ruler_by_task").rows[1] == ("Router", [50.0, 100.0, 75.0], 0.5)  # cwe, niah_single, Avg

    # qasper = (0.5*4 + 0.2*2)/6 = 0.4; gov_report 0.3; trec 1.0; Avg = mean of the three categories present.
    lbe = _table(built, "longbench_e_by_category")
    label, cells, sparsity = lbe.rows[0]
    assert (label, sparsity) == ("Static (Ω=0.50)", 0.5)
    assert cells[:6] == [pytest.approx(40.0), None, pytest.approx(30.0), pytest.approx(100.0), None, None]
    assert cells[6] == pytest.approx((40 + 30 + 100) / 3)
    assert _table(built, "longbench_e_by_length").rows[0][1] == [pytest.approx(40.0), pytest.approx(20.0), 100.0]

    v2 = _table(built, "longbench_v2")
    assert v2.columns == ["Overall", "Easy", "Hard", "Short", "Medium", "Long"]
    assert v2.rows == [("Dense (all FA)", [50.0, 100.0, pytest.approx(100 / 3), 75.0, None, 25.0], 0.0)]

    math_table = _table(built, "math")
    assert math_table.columns == ["GSM8K", "AIME", "Avg"]
    assert math_table.rows == [("Random (Ω=0.40)", [50.0, 0.0, 25.0], pytest.approx(0.4))]


def test_script_writes_markdown_and_csv(sweep, tmp_path):
    out = tmp_path / "tables" / "demo"
    proc = subprocess.run([sys.executable, str(SCRIPT), str(sweep / "*" / "results.json"), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, check=True)
    md = (out / "ruler_by_length.md").read_text(encoding="utf-8")
    assert "| Method | 1k | 2k | Avg | Sparsity |" in md
    assert "| Router | 75.0 | 75.0 | 75.0 | 0.50 |" in md
    assert "| Static (Ω=0.50) | 25.0 | 0.0 | 12.5 | 0.50 |" in md
    assert "n per cell: 2." in md
    assert "| Dense (all FA) | 50.0 | 100.0 | 33.3 | 75.0 | – | 25.0 | 0.00 |" in (out / "longbench_v2.md").read_text()
    with (out / "ruler_by_length.csv").open(encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["method", "1k", "2k", "Avg", "sparsity"]
    assert rows[1] == ["Dense (all FA)", "75.0000", "25.0000", "50.0000", "0.0000"]
    readme = (out / "README.md").read_text(encoding="utf-8")
    assert proc.stdout == readme and "### LongBench-E by category" in readme and "static_lbe" in readme


def test_same_label_runs_are_told_apart_by_sparse_settings(tmp_path):
    cells = [row("ruler/niah_single", 1024, 1, 1.0, 0.5)]
    write_run(tmp_path / "a", "router", cells, {"pattern": "streaming", "window": 1024})
    write_run(tmp_path / "b", "router", [row("ruler/niah_single", 1024, 1, 0.0, 0.5)],
              {"pattern": "streaming", "window": 2048})
    runs = [dict(tables.read_results(p), source=str(p)) for p in tables.find_results([str(tmp_path)])]
    assert [m.label for m in tables.group_methods(runs)] == ["Router [window=1024]", "Router [window=2048]"]


def provenance(*overrides: str, checkpoint: str | None = None) -> dict:
    return {"overrides": list(overrides),
            "checkpoint": None if checkpoint is None else {"source": checkpoint, "weights_sha256": "0f" * 32},
            "seeds": {"eval": 7}, "task": {"name": "ruler"}, "code": {"commit": "a1b2c3d4e5f6a7b8", "dirty": True},
            "flux_version": "0.1.0", "date": "2026-12-01T09:30:00Z"}


def ablation_sweep(root: Path) -> Path:
    """Three routers of a sweep (two swept jobs and the base job, with the overrides their runs were made with)
    and two baselines, the way run_all.sh lays them out."""
    def cells(score: float, omega: float) -> list[dict]:
        return [row("ruler/niah_single", 2048, 2, score, omega), row("ruler/cwe", 2048, 2, score / 2, omega)]

    common = ["+experiment=ablation_base", "backbone.source=/data/smollm2.gguf"]
    for job, extra, score, omega in (("+experiment=ablation_base,objective.target=0.3", ["objective.target=0.3"],
                                      0.9, 0.3),
                                     ("+experiment=ablation_base,objective.target=0.7", ["objective.target=0.7"],
                                      0.5, 0.7)):
        job_dir = root / "sweep" / job
        (job_dir / "wandb" / "offline-run-20261201_093000-abc").mkdir(parents=True)
        write_run(job_dir / "eval", "router", cells(score, omega),
                  provenance=provenance(*common, *extra, checkpoint=str(job_dir / "router")))
    write_run(root / "base" / "+experiment=ablation_base" / "eval", "router", cells(0.8, 0.5),
              provenance=provenance(*common, checkpoint=str(root / "base" / "+experiment=ablation_base" / "router")))
    write_run(root / "baselines" / "dense", "dense", cells(1.0, 0.0), provenance=provenance("routing.mode=dense"))
    write_run(root / "baselines" / "random_0.5", "random", cells(0.2, 0.5),
              provenance=provenance("routing.mode=random", "routing.sparsity=0.5"))
    return root


def test_sweep_rows_are_labelled_by_their_swept_values_and_drawn_on_a_pareto_figure(tmp_path):
    root = ablation_sweep(tmp_path)
    out, page = tmp_path / "tables", tmp_path / "pages" / "target.md"
    commands = ["python -m flux.train -m +experiment=ablation_base objective.target=0.3,0.7"]
    tables.main([str(root / "sweep"), str(root / "base"), str(root / "baselines"), "--out", str(out), "--pareto",
                 "--markdown", str(page), "--title", "Ablation: target", *[f"--command={c}" for c in commands]])
    runs = [dict(tables.read_results(p), source=str(p)) for p in tables.find_results([str(root)])]
    labels = [m.label for m in tables.group_methods(runs)]
    assert labels == ["Dense (all FA)", "Router [objective.target=0.3]", "Router [no swept override]",
                      "Router [objective.target=0.7]", "Random (Ω=0.50)"]  # routers ordered by their Ω
    text = page.read_text(encoding="utf-8")
    assert text.startswith("# Ablation: target\n\n```bash\n" + commands[0] + "\n```\n")
    assert "![score vs sparsity](../tables/pareto.png)" in text  # linked relative to the page
    assert "| Router [objective.target=0.3] | 90.0 | 45.0 | 67.5 | 30.0 | 30.0 | 0.30 |" in text  # ruler_by_type
    # the runs list says how each row was made, with the W&B run of each training job
    assert "overrides `+experiment=ablation_base backbone.source=/data/smollm2.gguf objective.target=0.3`" in text
    assert "router weights sha256 `0f0f0f0f0f0f`" in text and "commit `a1b2c3d4e5f6` (dirty tree)" in text
    assert f"W&B run `{root / 'sweep' / '+experiment=ablation_base,objective.target=0.3' / 'wandb'}" in text
    assert (out / "README.md").read_text(encoding="utf-8").count("![score vs sparsity](pareto.png)") == 1

    import matplotlib.image

    assert matplotlib.image.imread(out / "pareto.png").shape[2] in (3, 4)  # a real PNG
    fig = tables.draw_pareto(tables.group_methods(runs), {r["source"]: r for r in runs}, tmp_path / "again.png")
    assert fig.is_file()


def test_swept_labels_need_provenance_and_ignore_deletions():
    with_prov = [{"provenance": provenance("sparse=triangle")},
                 {"provenance": provenance("sparse=xattn", "~sparse.sink", "~sparse.window")}]
    assert tables._swept_labels(with_prov) == ["sparse=triangle", "sparse=xattn"]
    assert tables._swept_labels([with_prov[0], {}]) is None  # a file from before provenance: other labels apply
    assert tables._compact("objective.per_type.retrieval=0.3, router=global") == "retrieval=0.3, router=global"


def test_same_label_same_settings_fall_back_to_folder_names(tmp_path):
    for name, score in (("run0", 1.0), ("run1", 0.0)):
        write_run(tmp_path / name, "dense", [row("ruler/cwe", 1024, 1, score, 0.0)])
    runs = [dict(tables.read_results(p), source=str(p)) for p in tables.find_results([str(tmp_path)])]
    assert [m.label for m in tables.group_methods(runs)] == ["Dense (all FA) [run0]", "Dense (all FA) [run1]"]


def test_no_average_over_fewer_cells_and_perplexity(tmp_path):
    write_run(tmp_path / "d", "dense", [row("ruler/cwe", 1024, 20, 0.5, 0.0), row("ruler/cwe", 4096, 20, 0.25, 0.0),
                                        row("ppl/wiki", 2048, 10, 0.05, 0.0)])
    write_run(tmp_path / "f", "first_dense", [row("ruler/cwe", 1024, 20, 0.4, 0.7), row("ppl/wiki", 2048, 10, 0.04, 0.7)])
    runs = [dict(tables.read_results(p), source=str(p)) for p in tables.find_results([str(tmp_path)])]
    built = tables.build_tables(tables.group_methods(runs))
    assert _table(built, "ruler_by_length").rows == [("Dense (all FA)", [50.0, 25.0, 37.5], 0.0),
                                                     ("First-k dense (Ω=0.70)", [40.0, None, None], 0.7)]
    ppl = _table(built, "ppl")
    assert ppl.columns == ["wiki @2048"]
    assert [r[1] for r in ppl.rows] == [[pytest.approx(20.0)], [pytest.approx(25.0)]]  # perplexity = 1 / score


def test_bad_inputs(tmp_path, capsys):
    with pytest.raises(tables.TablesInputError, match="no results.json found"):
        tables.find_results([str(tmp_path / "nothing*")])
    write_run(tmp_path / "plain", "dense", [row("niah_single", 1024, 1, 1.0, 0.0)])
    with pytest.raises(SystemExit):
        tables.main([str(tmp_path / "plain"), "--out", str(tmp_path / "out")])
    assert "task 'niah_single' is not '<family>/<name>'" in capsys.readouterr().err
    runs = [dict(tables.read_results(tmp_path / "plain" / "results.json"), source="x")]
    runs[0]["results"] = [row("longbench_e/qasper", 5000, 1, 1.0, 0.0)]
    with pytest.raises(tables.TablesInputError, match="length 5000 is not a LongBench-E bucket"):
        tables.group_methods(runs)
