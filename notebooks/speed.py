# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Speed: what sparse layers buy
#
# `python -m flux.bench` times prefill and decode on a GPU for a range of context lengths and shares of layers on
# sparse attention, against the best dense backend on the same device. This notebook only reads its `bench.json`,
# so it runs without a GPU.
#
# By default it reads the `bench.json` in `experiments/example_run/`; set `FLUX_EXAMPLE_DIR` or edit the next cell to
# read another folder (the benchmark's output folder, or any folder holding one).

# %% tags=["parameters"]
import os
from pathlib import Path

REPO = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
RUN_DIR = Path(os.environ.get("FLUX_EXAMPLE_DIR", REPO / "experiments" / "example_run"))

# %%
# %matplotlib inline
from IPython.display import display

from flux import viz

try:
    bench = viz.load_bench(viz.find_run_files(RUN_DIR).bench_file())
except viz.INPUT_ERRORS as err:
    bench = None
    print(f"Cannot load: {err}")

if bench is not None:
    print(f"{bench['backbone']} on {bench['device']}, dense backend {bench.get('dense_backend', 'n/a')}")
    longest = max(row["context"] for row in bench["rows"])
    print(f"At the longest context ({longest} tokens):")
    print(f"{'phase':>8} {'batch':>5} {'SA':>5} {'ms':>9} {'speedup':>8} {'peak GB':>8}")
    for row in sorted(bench["rows"], key=lambda r: (r["phase"], r["batch"], r["sa_fraction"])):
        if row["context"] == longest:
            print(f"{row['phase']:>8} {row['batch']:>5} {row['sa_fraction']:>5.0%} {row['ms']:>9.2f}"
                  f" {row['speedup']:>7.2f}x {row.get('peak_mem_gb', float('nan')):>8.2f}")

# %% [markdown]
# ## Speedup vs context length
#
# One line per share of layers on SA (and per batch size, by line style), as a multiple of dense speed at the same
# context and batch. Expect the gain to grow with context, since SA cost stays flat while dense attention grows,
# and to be larger in decode, where SA layers also read a much smaller KV cache.

# %% tags=["figure"]
if bench is None:
    print("Skipped speedup_vs_length: bench.json did not load (see the message above).")
else:
    display(viz.speedup_vs_length(bench))
