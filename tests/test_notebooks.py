"""Execute the jupytext notebooks end to end on synthetic output files (no GPU) and check what every cell shows."""

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


@pytest.mark.parametrize(("name", "figures"), [("routing_maps", 5), ("speed", 1)])
def test_notebook_draws_every_figure(name: str, figures: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     kernel_env: None) -> None:
    example = fx.write_example_run(tmp_path / "example", num_layers=6)
    monkeypatch.setenv("FLUX_EXAMPLE_DIR", str(example))
    monkeypatch.setenv("FLUX_NUM_LAYERS", "6")
    notebook = _execute(name, tmp_path)
    cells = _figure_cells(notebook)
    assert len(cells) == figures
    assert [_images(c) for c in cells] == [1] * figures
    assert "Cannot" not in _text(notebook)


@pytest.mark.parametrize(("name", "figures"), [("routing_maps", 5), ("speed", 1)])
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
    assert f"{bad / 'metrics.csv'} not found" in text
    assert text.count("Skipped ") == 5
    assert [_images(c) for c in _figure_cells(notebook)] == [0] * 5


def test_speed_explains_missing_bench(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel_env: None) -> None:
    monkeypatch.setenv("FLUX_EXAMPLE_DIR", str(tmp_path / "nowhere"))
    notebook = _execute("speed", tmp_path)
    text = _text(notebook)
    assert f"{tmp_path / 'nowhere' / 'bench.json'} not found" in text
    assert "Skipped speedup_vs_length" in text


@pytest.mark.parametrize("name", ["routing_maps", "speed"])
def test_ipynb_is_paired_with_py(name: str) -> None:
    """The reviewed .py and the committed .ipynb hold the same cells, and the .ipynb carries no stale outputs."""
    source = jupytext.read(NOTEBOOKS / f"{name}.py")
    paired = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    assert [(c.cell_type, c.source) for c in paired.cells] == [(c.cell_type, c.source) for c in source.cells]
    assert all(not c.get("outputs") for c in paired.cells if c.cell_type == "code")
