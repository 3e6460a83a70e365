"""flux.bench pieces that run without a GPU: config/overrides, plans, ratios, outputs, and the no-CUDA exit."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from flux import bench
from flux.plan import spread_sa_layers


def test_plain_config_and_overrides():
    cfg = bench.load_plain_config(["lengths=[1024,2048]", "decode.steps=4", "sink=0"])
    assert cfg["lengths"] == [1024, 2048]
    assert cfg["decode"]["steps"] == 4
    assert cfg["sink"] == 0
    assert cfg["backbone"]["num_hidden_layers"] == 28


@pytest.mark.parametrize("override,match", [
    ("lenghts=[1]", r"override 'lenghts=\[1\]': conf/bench.yaml has no key 'lenghts'"),
    ("decode.stepz=3", "has no key 'decode.stepz'"),
    ("sink.x=3", "has no key 'sink.x'"),
    ("decode=3", "'decode' is a config section; set one of its keys instead, e.g. decode.enabled=..."),
    ("lengths", "is not key=value"),
    ("lengths=abc", "lengths=abc must be a non-empty list of positive integers"),
    ("sa_fractions=[1.5]", r"must lie in \[0, 1\]"),
])
def test_bad_overrides(override, match):
    with pytest.raises(bench.BenchConfigError, match=match):
        bench.load_plain_config([override])


@pytest.mark.parametrize("fraction,expected", [(0.0, 0), (0.25, 7), (0.5, 14), (0.75, 21), (1.0, 28)])
def test_spread_plan_counts_and_spacing(fraction, expected):
    plan = spread_sa_layers(28, fraction)
    assert sum(plan) == expected
    idx = [i for i, sa in enumerate(plan) if sa]
    if len(idx) > 1:
        gaps = {b - a for a, b in itertools.pairwise(idx)}
        assert max(gaps) - min(gaps) <= 1


def test_spread_plan_half_alternates():
    assert spread_sa_layers(4, 0.5) == [False, True, False, True]


def test_ideal_speedup():
    assert bench.ideal_speedup(1000.0, 14, 25.0) == pytest.approx(1000.0 / 650.0)
    assert bench.ideal_speedup(100.0, 4, 25.0) == float("inf")


def test_outputs_from_a_result(tmp_path):
    result = {
        "env": {"gpu": "Test GPU", "copy_bw_tbps": 3.0},
        "prefill": [{"batch": 1, "length": 8192, "sa_fraction": f, "ttft_ms": 100.0 / (1 + f), "speedup": 1 + f,
                     "ideal_speedup": 1 + 1.1 * f, "fraction_of_ideal": (1 + f) / (1 + 1.1 * f), "peak_mem_gib": 20.0}
                    for f in (0.0, 0.5)],
        "decode": [{"batch": 8, "batch_kind": "fixed", "length": 8192, "sa_fraction": 0.5, "ms_per_token": 10.0,
                    "tokens_per_s": 800.0, "throughput_vs_dense_same_batch": 1.5, "over_limit": 1.1,
                    "kv_cache_gib": 3.0}],
        "router": [{"length": 8192, "router_op_ms": 0.02, "router_graph_ms": 0.01, "router_with_sync_ms": 0.05}],
    }
    bench.write_outputs(result, tmp_path)
    assert json.loads((tmp_path / "bench.json").read_text())["env"]["gpu"] == "Test GPU"
    table = (tmp_path / "table.md").read_text()
    assert "| 1 | 8192 | 0.5 | 66.7 | 1.50 | 1.55 | 0.97 | 20.0 |" in table
    assert "| 8192 | router | 0.0200 | 0.0100 | 0.0500 |" in table
    assert (tmp_path / "speedup.png").stat().st_size > 1000


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on machines without CUDA")
def test_without_cuda_exits_with_message(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--no-hydra", "lengths=[1024]"])
    assert exc.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err
