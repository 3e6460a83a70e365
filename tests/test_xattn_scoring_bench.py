"""experiments/patterns/xattn_scoring_bench.py (the GPU bench of XAttention's scoring kernels) end to end in its
--smoke mode: tiny shapes through Triton's CPU interpreter, every variant checked against the torch fallback, timed
rows, the JSON and the markdown table it prints last."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "patterns" / "xattn_scoring_bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("xattn_scoring_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_attention_tiling_specs_parse_or_say_how(bench):
    assert bench.attn_tiling("128x64w8s3") == {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3}
    with pytest.raises(SystemExit, match="write MxNwWsS"):
        bench.attn_tiling("128-64")


def test_flop_count_is_the_causal_strided_multiply_adds(bench):
    """2 * stride * head_dim per (strided row, strided column <= row) per head, counted by brute force."""
    heads, length, dim, stride = 3, 37, 16, 4
    n = -(-length // stride)
    cells = sum(1 for r in range(n) for c in range(n) if c <= r)
    assert bench.scoring_flops(heads, length, dim, stride) == 2 * heads * stride * dim * cells


def test_smoke_run_times_every_variant(bench, tmp_path, capsys):
    out = tmp_path / "rows.json"
    rows = bench.main(["--smoke", "--tiles", "r16c16d128w4s1", "r128c128d64w8s3:1", "--attn-tiles", "32x16w2s1",
                       "--out", str(out)])
    labels = [r["variant"] for r in rows]
    assert labels == ["two-pass r64c64d128w4s3", "one-pass r16c16d128w4s1",
                      "one-pass r128c128d64w8s3 scratch 1 MiB", "attention 32x16w2s1", "pattern (default tiles)"]
    shape = bench.SMOKE_SHAPE
    flops = bench.scoring_flops(shape["heads"], shape["lengths"][0], shape["head_dim"], shape["stride"])
    for row in rows:
        assert row["length"] == shape["lengths"][0] and row["attn_ms"] > 0 and row["dense_ms"] > 0
        assert row["speedup"] == pytest.approx(row["dense_ms"] / row["attn_ms"])
        if row["variant"] != "pattern (default tiles)":
            assert row["scoring_tflops"] == pytest.approx(flops / (row["scoring_ms"] * 1e9))
    assert json.loads(out.read_text())["rows"] == rows
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-len(rows) - 2].startswith("| length | variant | scoring ms | scoring TFLOP/s")
    assert sum(line.startswith("check ") for line in printed) == 4  # each scoring variant and attention tiling
