"""flux.bench_patterns: its config checks and pair densities on CPU, XAttention's density on real SmolLM2
activations against the float64 reference, and the timed rows on a GPU."""

from __future__ import annotations

import copy

import pytest
import torch
from flux_kernels.reference import xattn_block_scores_reference, xattn_select_reference

from flux.attention.patterns import StreamingPattern, TrianglePattern, XAttentionPattern
from flux.bench import load_plain_config
from flux.bench_patterns import (
    PatternBenchError,
    check_patterns_config,
    positional_pair_density,
    run_patterns,
    xattn_real_density,
)


@pytest.mark.parametrize("pattern", [StreamingPattern(sink=3, window=5), StreamingPattern(sink=0, window=40),
                                     TrianglePattern(sink=2, window=4, last_q=6), TrianglePattern(1, 50, 100)])
def test_pair_density_counts_visible_pairs(pattern):
    length = 37
    p = torch.arange(length)
    visible = pattern.visible(p[:, None], p[None, :], length) & (p[None, :] <= p[:, None])
    assert positional_pair_density(pattern, length) == pytest.approx(float(visible.sum()) / (length * (length + 1) / 2))


@pytest.mark.parametrize("override,message", [
    ("patterns.names=[streaming,nope]", "must name registered patterns"),
    ("patterns.lengths=[]", "non-empty list of positive integers"),
    ("patterns.xattn_densities=[0.1,1.5]", r"must lie in \(0, 1\]"),
    ("patterns.params={xattn: {stride: 3}}", "xattn stride must divide block_size=128, got 3"),
    ("patterns.params={banana: {x: 1}}", "settings for 'banana', which is not in patterns.names"),
])
def test_bad_patterns_settings_fail_before_gpu_work(override, message):
    """The bench config loader checks the patterns section before anything touches a GPU."""
    with pytest.raises((PatternBenchError, ValueError), match=message):
        load_plain_config([override])


def test_default_bench_settings_are_valid():
    cfg = load_plain_config([])
    check_patterns_config(cfg["patterns"])
    assert cfg["patterns"]["names"] == ["streaming", "triangle", "xattn"]
    assert cfg["patterns"]["xattn_densities"] == [0.05, 0.10, 0.25]


@pytest.mark.slow
def test_xattn_density_on_real_smollm2_activations(smollm2):
    """The probe's per-layer density equals the float64 reference selection on the same layer's query/key states,
    and the probe leaves the model's logits and attention implementation as they were."""
    from transformers.modeling_utils import AttentionInterface

    model = smollm2.model
    text = "The archive lists old maps, letters and ledgers from the harbour office. " * 30
    ids = smollm2.tokenizer(text, return_tensors="pt")["input_ids"][:, :300]
    pattern = XAttentionPattern(block_size=32, stride=8, threshold=0.9)
    captured = {}
    # the session's backbone may be wrapped by a FluxModel (which refuses unrouted calls): run it plain here
    fixture_impl = copy.copy(model.config._attn_implementation)
    model.set_attn_implementation("sdpa")
    original = "sdpa"
    with torch.no_grad():
        want_logits = model(input_ids=ids, use_cache=False).logits

    result = xattn_real_density(model, [ids], pattern)
    assert model.config._attn_implementation == original
    assert len(result["per_layer"]) == smollm2.num_layers and result["tokens"] == [300]
    assert 0.0 < result["density"] < 1.0

    # the same layer through a capturing function and the reference selection
    layer = 7

    def capture(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx == layer:
            captured["q"], captured["k"], captured["scale"] = query, key, kwargs.get("scaling")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("flux_test_capture", capture)
    model.set_attn_implementation("flux_test_capture")
    try:
        with torch.no_grad():
            got_logits = model(input_ids=ids, use_cache=False).logits
    finally:
        model.set_attn_implementation(fixture_impl)
    torch.testing.assert_close(got_logits, want_logits)
    scores = xattn_block_scores_reference(captured["q"], captured["k"], None, 32, 8, captured["scale"])
    keep = xattn_select_reference(scores, None, 32, 300, threshold=0.9)
    n_blocks = keep.shape[-1]
    causal = n_blocks * (n_blocks + 1) // 2 * keep.shape[1]
    assert result["per_layer"][layer] == pytest.approx(float(keep.sum()) / causal)


@pytest.mark.gpu
def test_run_patterns_rows_on_gpu():
    # 32k: at 8k the sink and diagonal blocks alone are ~6% of the causal blocks, so 5% cannot be hit
    cfg = load_plain_config(["patterns.lengths=[32768]", "patterns.repeats=2"])
    rows = run_patterns(cfg, torch.device("cuda"))
    names = [(r["pattern"], round(r["density"], 2)) for r in rows]
    assert [n for n, _ in names] == ["streaming", "triangle", "xattn", "xattn", "xattn"]
    for row in rows:
        assert isinstance(row["attn_ms"], float) and isinstance(row["dense_ms"], float)
        assert row["speedup_vs_dense"] == pytest.approx(row["dense_ms"] / row["attn_ms"])
    xattn = [r for r in rows if r["pattern"] == "xattn"]
    assert [round(r["density"], 2) for r in xattn] == pytest.approx([0.05, 0.10, 0.25], abs=0.02)
    assert all(isinstance(r["scoring_ms"], float) for r in xattn)
