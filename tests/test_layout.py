"""The arrows of DESIGN.md's layout hold: inference never imports Lightning, and library code never imports an entry
point. Checked in a fresh interpreter, since this test session has imported everything already."""

from __future__ import annotations

import json
import subprocess
import sys

ENTRY_POINTS = ("flux.train", "flux.evaluate", "flux.bench", "flux.passkey", "flux.demo")
TRAINING_ONLY = ("lightning", "pytorch_lightning", "torchmetrics", "wandb")


def modules_loaded_by(*names: str) -> dict[str, list[str]]:
    """{name: every module loaded once `name` is imported}, importing `names` in order in one new interpreter, so a
    failure names the first import that pulled a module in."""
    code = ("import importlib, json, sys\n"
            "loaded = {}\n"
            f"for name in {list(names)!r}:\n"
            "    importlib.import_module(name)\n"
            "    loaded[name] = sorted(sys.modules)\n"
            "print(json.dumps(loaded))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_inference_modules_do_not_import_lightning() -> None:
    inference = ["flux.model", "flux.router", "flux.configs", "flux.evaluate", "flux.viz", "flux.lm_eval_backend"]
    loaded = modules_loaded_by(*inference)
    assert list(loaded) == inference
    for name, modules in loaded.items():
        assert name in modules  # the probe really imported it
        assert not {m.split(".")[0] for m in modules} & set(TRAINING_ONLY), f"importing {name} loads Lightning"


def test_library_modules_do_not_import_entry_points() -> None:
    library = ["flux.model", "flux.router", "flux.configs", "flux.lit", "flux.callbacks", "flux.viz", "flux.evals",
               "flux.data.module"]
    loaded = modules_loaded_by(*library)
    for name, modules in loaded.items():
        assert not set(modules) & set(ENTRY_POINTS), f"importing {name} loads an entry point"
