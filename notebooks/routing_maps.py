# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Routing maps
#
# Where does the trained router send each layer, how does that change with the task and the input length, and what
# does it cost in quality? Every figure below is drawn by `flux.viz` from the files `flux.evaluate` and `flux.train`
# write, so the same figure appears in W&B during training.
#
# The first cell holds the folder to read: any folder that `flux.train` or `flux.evaluate` wrote, or a folder holding
# several of them (a sweep). The notebook finds the files itself: every `results.json` below it is one point in the
# quality-sparsity plot; the routing figures draw an evaluated router's `routing.jsonl` (or, in a training run, its
# last validation pass); the training curves read `metrics.csv`. By default it reads `experiments/example_run/` (a
# SmolLM2 run committed with the repository); set the environment variable `FLUX_EXAMPLE_DIR` or edit the cell to
# read your own.

# %% tags=["parameters"]
import os
from pathlib import Path

REPO = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
RUN_DIR = Path(os.environ.get("FLUX_EXAMPLE_DIR", REPO / "experiments" / "example_run"))
# Layer count of the backbone (30 for SmolLM2-135M); None skips the check that the records match it.
NUM_LAYERS = int(os.environ["FLUX_NUM_LAYERS"]) if os.environ.get("FLUX_NUM_LAYERS") else None

# %%
# %matplotlib inline
from IPython.display import display

from flux import viz


def load(loader, *args, **kwargs):
    """Run a flux.viz loader; on bad input print its message and return None so the figure cells can skip."""
    try:
        return loader(*args, **kwargs)
    except viz.INPUT_ERRORS as err:
        print(f"Cannot load: {err}")
        return None


def show(draw, data, **kwargs):
    """Display one flux.viz figure, or say in one line why it cannot be drawn."""
    if data is None:
        print(f"Skipped {draw.__name__}: its input did not load (see the message in the loading cell).")
        return
    try:
        display(draw(data, **kwargs))
    except viz.INPUT_ERRORS as err:
        print(f"Cannot draw {draw.__name__}: {err}")


files = load(viz.find_run_files, RUN_DIR)
records = runs = metrics = None
if files is not None:
    print(f"{RUN_DIR}: {len(files.results)} results.json, {len(files.routing)} routing files, "
          f"{len(files.metrics)} metrics.csv")
    routing_file = load(files.routing_file)
    records = load(viz.load_routing, routing_file, num_layers=NUM_LAYERS) if routing_file else None
    runs = load(viz.load_results, RUN_DIR)
    metrics_file = load(files.metrics_file)
    metrics = load(viz.load_metrics, metrics_file) if metrics_file else None

if records is not None:
    tasks = sorted({r.task for r in records})
    print(f"routing: {routing_file.relative_to(RUN_DIR)}: {len(records)} samples, {records[0].num_layers} layers, "
          f"tasks: {', '.join(tasks)}")
if runs is not None:
    for run in runs:
        summary = run["summary"]
        print(f"{run['routing']:>12}: score {summary['score']:.3f}  sparsity {summary['sparsity']:.2f}"
              f"  ({Path(run['source']).parent.relative_to(RUN_DIR)})")
if metrics is not None:
    print(f"training curves: {metrics_file.relative_to(RUN_DIR)}")

# %% [markdown]
# ## Layer x sample decisions
#
# Each column is one evaluated sample, each row one layer; blue is full attention, orange sparse attention. Samples
# are grouped by task (coloured bar on top). Look for rows that are blue for every task (layers the model cannot give
# up) and for blocks where retrieval tasks keep more layers on FA than holistic ones.

# %% tags=["figure"]
show(viz.routing_heatmap, records)

# %% [markdown]
# ## FA probability per layer and task
#
# The router's probability of keeping each layer on full attention, averaged over a task's samples (the dashed line
# is all samples). Tasks whose curves separate are routed differently; a curve near 1 everywhere means the sparsity
# target is not yet met for that task.

# %% tags=["figure"]
show(viz.layer_fa_probability, records)

# %% [markdown]
# ## Per-sample sparsity by task and by length
#
# The share of layers on SA for each sample. A context-aware router spreads these: retrieval tasks should sit lower
# than holistic ones, and longer inputs should not simply collapse to one value. Input lengths are grouped into
# power-of-two buckets (each box says how many samples it holds) once there are more than six distinct lengths.

# %% tags=["figure"]
show(viz.sparsity_distribution, records)

# %% [markdown]
# ## Context awareness per input
#
# The paper's promise is a router that adapts to each input, not only to each task: a retrieval prompt whose answer
# sits inside the sparse window could be routed sparser than one whose answer is far from the question. The left
# panel shows, per task, the Ω of every input and how many distinct layer plans the task's inputs got (one plan for
# all inputs means the router routes by task alone). The right panel puts each input's Ω against how far its answer
# sits from the question (`needle_distance_tokens`, which `flux.evaluate` records in `routing.jsonl` for RULER
# retrieval samples), with the sparse window marked: left of that line the answer is visible to SA layers too.
# Spearman's rho per task says whether Ω falls as the answer moves away.

# %%
WINDOW = None
if runs is not None:  # the sparse window the evaluated router ran with, from its results.json
    window = [r["sparse"].get("window") for r in runs if r["routing"] == "router"]
    WINDOW = window[0] if window else None
stats = load(viz.per_input_stats, records) if records is not None else None
if stats is not None:
    print(f"{'task':<28}{'n':>4}{'mean Ω':>9}{'std Ω':>8}{'plans':>7}{'rho(Ω, distance)':>19}")
    for s in stats:
        rho = "n/a" if s["spearman"] is None else f"{s['spearman']:+.2f}"
        print(f"{s['task']:<28}{s['n']:>4}{s['omega_mean']:>9.2f}{s['omega_std']:>8.3f}{s['distinct_plans']:>7}"
              f"{rho:>19}")
    if not any(s["with_prop"] for s in stats):
        print("\nThis routing.jsonl records no answer positions: it was written before flux.evaluate recorded them "
              "(the committed experiments/example_run is such a file), so the right panel is empty. Evaluate a "
              "router with this flux (any run of experiments/ablations/run_all.sh does) and point FLUX_EXAMPLE_DIR "
              "at it to see Ω against the answer's distance.")

# %% tags=["figure"]
show(viz.context_awareness, records, window=WINDOW)

# %% [markdown]
# ## Quality vs sparsity
#
# One point per evaluated routing: dense, the trained router, and the baselines (all sparse, static, first layers
# dense, random). The grey line is the Pareto front; the router is worth its cost when it lies on that front, close
# to the dense score at a clearly higher sparsity than the baselines.

# %% tags=["figure"]
show(viz.quality_vs_sparsity, runs)

# %% [markdown]
# ## Training curves
#
# Loss parts, the measured sparsity against its target (overall and per task), the Gumbel temperature and the
# Lagrange multipliers. Healthy training shows the hard sparsity reaching the target as the temperature anneals, with
# the multipliers levelling off rather than growing without bound.

# %% tags=["figure"]
show(viz.training_curves, metrics)
