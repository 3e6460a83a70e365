"""Execute the jupytext notebooks end to end (no GPU) and check what every cell shows: on synthetic output files, on
the committed example run, and on the folders real flux.train / flux.evaluate runs leave (alone and as a sweep)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest
import viz_fixtures as fx
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
EXAMPLE_RUN = REPO / "experiments" / "example_run"
KERNEL = "flux-test-python"


def _execute(name: str, tmp_path: Path) -> nbformat.NotebookNode:
    """Run notebooks/<name>.py in a kernel of this interpreter, declared in a private kernelspec folder."""
    kernels = tmp_path / "kernels"
    write_kernel_spec(kernels / KERNEL, overrides={"argv": [sys.executable, "-m", "ipykernel_launcher", "-f",
                                                            "{connection_file}"]})
    manager = KernelManager(kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))
    notebook = jupytext.read(NOTEBOOKS / f"{name}.py")
    NotebookClient(notebook, km=manager, timeout=120, resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return notebook


@pytest.fixture()
def kernel_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the kernel's connection files and IPython profile out of the user's home."""
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))


def _figure_cells(notebook: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [c for c in notebook.cells if "figure" in c.get("metadata", {}).get("tags", [])]


def _text(notebook: nbformat.NotebookNode) -> str:
    return "".join(out.get("text", "") for c in notebook.cells if c.cell_type == "code" for out in c.outputs)


def _images(cell: nbformat.NotebookNode) -> int:
    return sum("image/png" in out.get("data", {}) for out in cell.outputs)


@pytest.mark.parametrize(("name", "figures"), [("routing_maps", 6), ("speed", 1)])
def test_notebook_draws_every_figure(name: str, figures: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     kernel_env: None) -> None:
    example = fx.write_example_run(tmp_path / "example", num_layers=6)
    monkeypatch.setenv("FLUX_EXAMPLE_DIR", str(example))
    monkeypatch.setenv("FLUX_NUM_LAYERS", "6")
    notebook = _execute(name, tmp_path)
    cells = _figure_cells(notebook)
    assert len(cells) == figures
    assert [_images(c) for c in cells] == [1] * figures
    text = _text(notebook)
    assert "Cannot" not in text
    if name == "routing_maps":  # the per-input table: one line per task, rho where the answer positions are known
        from flux import viz

        stats = viz.per_input_stats(viz.load_routing(example / "router"))
        for s in stats:
            assert f"{s['task']:<28}{s['n']:>4}{s['omega_mean']:>9.2f}" in text
        assert "records no answer positions" not in text


@pytest.mark.parametrize(("name", "figures"), [("routing_maps", 6), ("speed", 1)])
def test_notebook_draws_every_figure_from_the_committed_example_run(name: str, figures: int, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     kernel_env: None) -> None:
    """The notebooks' default input: the example output set of a real SmolLM2 run, once it is in the repository."""
    if not EXAMPLE_RUN.is_dir():
        pytest.skip(f"{EXAMPLE_RUN} is not in this checkout yet")
    monkeypatch.delenv("FLUX_EXAMPLE_DIR", raising=False)
    monkeypatch.delenv("FLUX_NUM_LAYERS", raising=False)
    notebook = _execute(name, tmp_path)
    assert [_images(c) for c in _figure_cells(notebook)] == [1] * figures
    assert "Cannot" not in _text(notebook)
    if name == "routing_maps":  # the committed run predates recorded answer positions: the notebook says so
        assert "This routing.jsonl records no answer positions" in _text(notebook)


def test_routing_maps_explains_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel_env: None) -> None:
    """Wrong layer count, empty results and a missing metrics file: one message each, no traceback, no figure."""
    bad = tmp_path / "bad"
    fx.write_jsonl(bad / "router" / "routing.jsonl", fx.routing_records("router", num_layers=6))
    empty = fx.results_from("router", fx.routing_records("router", num_layers=6)) | {"results": []}
    (bad / "router" / "results.json").write_text(json.dumps(empty), encoding="utf-8")
    monkeypatch.setenv("FLUX_EXAMPLE_DIR", str(bad))
    monkeypatch.setenv("FLUX_NUM_LAYERS", "30")
    notebook = _execute("routing_maps", tmp_path)
    text = _text(notebook)
    assert "records have 6 layers but num_layers=30 was expected" in text
    assert "'results' must be a non-empty list of rows" in text
    assert f"no metrics.csv under {bad}; `python -m flux.train` writes it" in text
    assert text.count("Skipped ") == 6
    assert [_images(c) for c in _figure_cells(notebook)] == [0] * 6


def test_speed_explains_missing_bench(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel_env: None) -> None:
    monkeypatch.setenv("FLUX_EXAMPLE_DIR", str(tmp_path / "nowhere"))
    notebook = _execute("speed", tmp_path)
    text = _text(notebook)
    assert f"run folder {tmp_path / 'nowhere'} not found" in text
    assert "Skipped speedup_vs_length" in text


@pytest.fixture(scope="module")
def run_folders(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sweep folder as flux leaves it: `train/` (a short flux.train run) and `eval/{dense,router}/` (flux.evaluate
    of the dense baseline and of the router just trained), all on the tiny Llama."""
    from hydra import compose, initialize_config_module

    from flux.conf import CONFIG_MODULE
    from flux.evaluate import evaluate
    from flux.train import run

    root = tmp_path_factory.mktemp("sweep")
    common = [f"backbone.source={tiny_dir}", "backbone.dtype=float32", "sparse.sink=4", "sparse.window=16"]
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        run(compose("train", [*common, "logger=csv", "data.tasks=[niah_single,fwe]", "data.length_tokens=128",
                              "data.max_tokens=256", "trainer.max_steps=2", "trainer.val_check_interval=2",
                              f"output_dir={root / 'train'}"]))
        for mode in ("dense", "router"):
            evaluate(compose("evaluate", [*common, "eval.task.tasks=[niah_single,fwe]", "eval.task.lengths=[256]",
                                          "eval.task.n=2", "eval.task.max_new_tokens=2", f"routing.mode={mode}",
                                          f"routing.checkpoint={root / 'train' / 'router'}",
                                          f"output_dir={root / 'eval' / mode}"]))
    return root


@pytest.mark.slow
@pytest.mark.parametrize(("folder", "routing", "missing"), [
    ("train", "routing_maps/val_step000002.routing.jsonl", "no results.json under"),
    ("eval/router", "routing.jsonl", "no metrics.csv under"),
    ("", "eval/router/routing.jsonl", None),
])
def test_routing_maps_opens_any_run_folder(run_folders: Path, folder: str, routing: str, missing: str | None,
                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel_env: None) -> None:
    """A training run, an evaluation run and a sweep folder holding both: the notebook finds its files in each and
    draws what they support, naming what is missing instead of failing."""
    monkeypatch.setenv("FLUX_EXAMPLE_DIR", str(run_folders / folder))
    monkeypatch.delenv("FLUX_NUM_LAYERS", raising=False)
    notebook = _execute("routing_maps", tmp_path)
    text = _text(notebook)
    assert f"routing: {routing}: " in text and "3 layers" in text
    drawn = [_images(c) for c in _figure_cells(notebook)]
    if missing is None:
        assert drawn == [1] * 6 and "Cannot" not in text
        assert "       dense: score" in text and "      router: score" in text
    else:
        assert sum(drawn) == 5 and missing in text  # the one figure without its input says why


@pytest.mark.parametrize("name", ["routing_maps", "speed"])
def test_ipynb_is_paired_with_py(name: str) -> None:
    """The reviewed .py and the committed .ipynb hold the same cells, and the .ipynb carries no stale outputs."""
    source = jupytext.read(NOTEBOOKS / f"{name}.py")
    paired = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    assert [(c.cell_type, c.source) for c in paired.cells] == [(c.cell_type, c.source) for c in source.cells]
    assert all(not c.get("outputs") for c in paired.cells if c.cell_type == "code")
