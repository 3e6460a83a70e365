"""The GPU measurement script of experiments/train_scale, run end to end in its CPU dry-run mode: real
`python -m flux.train` runs of the qwen_32k recipe on a cut-down random Qwen3-8B preset, one of them too long for the
preset (it must become an ok=false row with flux's one-line error), and the JSON and table it writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIELDS = {"length", "batch", "checkpointing", "step_s", "tokens_per_s", "peak_gib", "ok"}


@pytest.mark.slow
def test_dry_run_measures_real_training_runs_and_records_failures(tmp_path):
    out, runs = tmp_path / "out", tmp_path / "runs"
    done = subprocess.run(["bash", "experiments/train_scale/device_run.sh", "--dry-run", "--out", str(out),
                           "--runs", str(runs)], check=False, cwd=REPO, env={**os.environ, "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "train_scale.json").read_text())
    assert result["dry_run"] is True and result["gpu"]
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["600_ckpt", "1500_nockpt"]
    for row in rows.values():
        assert FIELDS <= set(row) and row["batch"] == 1 and row["estimate_gib"] > 0
    row = rows["600_ckpt"]
    assert row["ok"] is True and row["checkpointing"] is True
    assert row["step_s"] > 0 and 590 < row["tokens"] < 640
    assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["step_s"], rel=1e-2)
    assert row["peak_gib"] is None  # no CUDA, no peak
    assert (runs / "600_ckpt" / "router" / "router.json").is_file()  # flux.train ran to its end and exported
    assert "+experiment=qwen_32k" in row["command"] and "backbone=qwen3_8b_random" in row["command"]
    assert "gradient_checkpointing=true" in row["command"]
    failed = rows["1500_nockpt"]
    assert failed["ok"] is False and failed["step_s"] is None and failed["checkpointing"] is False
    assert failed["error"].startswith("error: the longest training prompt has") and "1024 positions" in failed["error"]
    table = (out / "train_scale.md").read_text()
    assert table.count("| qwen_32k / qwen3_8b_random |") == 2 and "**no**" in table
