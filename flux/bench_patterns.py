"""Speed of each sparse pattern's prefill attention against the best dense SDPA kernel, one attention layer alone
(the `patterns` section of flux.bench, settings under `patterns:` in conf/bench.yaml), and the block density that
XAttention's threshold selects on a real model's activations.

Random weights give near-uniform attention, so XAttention's threshold would keep almost every block; its rows are
timed at fixed block densities instead (scoring and selection included), and `xattn_real_density` reports the
density the default threshold produces on real activations (SmolLM2) to read them against.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch

from flux.attention.patterns import PATTERNS, SparsePattern, XAttentionPattern, get_pattern
from flux.errors import FluxUserError

PROBE_NAME = "flux_xattn_density_probe"


class PatternBenchError(FluxUserError):
    """A `patterns:` bench setting is invalid."""


def check_patterns_config(pcfg: dict[str, Any]) -> None:
    """One clear error per bad `patterns:` setting, before any GPU work."""
    for key in ("lengths", "names", "xattn_densities", "warmup", "repeats", "params"):
        if key not in pcfg:
            raise PatternBenchError(f"patterns.{key} is missing from the bench config (see conf/bench.yaml)")
    if not pcfg["lengths"] or any(int(t) < 1 for t in pcfg["lengths"]):
        raise PatternBenchError(f"patterns.lengths={pcfg['lengths']} must be a non-empty list of positive integers")
    unknown = [n for n in pcfg["names"] if n not in PATTERNS]
    if unknown or not pcfg["names"]:
        raise PatternBenchError(f"patterns.names={pcfg['names']} must name registered patterns: "
                                f"{', '.join(sorted(PATTERNS))}")
    if any(not 0.0 < float(x) <= 1.0 for x in pcfg["xattn_densities"]):
        raise PatternBenchError(f"patterns.xattn_densities={pcfg['xattn_densities']} must lie in (0, 1]")
    for name in pcfg["params"] or {}:
        if name not in pcfg["names"]:
            raise PatternBenchError(f"patterns.params has settings for {name!r}, which is not in patterns.names")
    for name in pcfg["names"]:
        build_bench_pattern(pcfg, name)  # parameter errors come from the pattern itself


def build_bench_pattern(pcfg: dict[str, Any], name: str) -> SparsePattern:
    return get_pattern(name, **dict((pcfg.get("params") or {}).get(name) or {}))


def positional_pair_density(pattern: SparsePattern, seq_len: int) -> float:
    """Visible (query, key) pairs / causal pairs of a sink + window pattern over an unpadded prompt, counted per
    row in closed form (row p sees min(p + 1, window) window keys and the sinks before its window); triangle's
    last `last_q` rows see all p + 1 keys."""
    policy = pattern.kv_policy()
    if policy is None or pattern.name not in ("streaming", "triangle"):
        raise PatternBenchError(f"no closed-form pair density for pattern {pattern.name!r}")
    sink, window = policy
    p = torch.arange(seq_len, dtype=torch.float64)
    per_row = torch.clamp(p + 1, max=window) + torch.clamp(torch.clamp(p + 1 - window, min=0), max=sink)
    dense_last = getattr(pattern, "last_q", 0)
    if dense_last:
        rows = p >= seq_len - dense_last
        per_row = torch.where(rows, p + 1, per_row)
    return float(per_row.sum() / (seq_len * (seq_len + 1) / 2))


def run_patterns(cfg: dict[str, Any], device: torch.device) -> list[dict[str, Any]]:
    """Rows `pattern, length, density, attn_ms, dense_ms, speedup_vs_dense` (plus `dense_backend`, `params`, and
    `scoring_ms` for xattn: scoring + selection alone) at batch 1 and the backbone's head shape. Each pattern runs
    its Triton prefill; the dense baseline is the fastest SDPA backend measured at the same length."""
    pcfg = cfg["patterns"]
    check_patterns_config(pcfg)
    rows: list[dict[str, Any]] = []
    for length in (int(t) for t in pcfg["lengths"]):
        rows += _length_rows(cfg, device, length)
        torch.cuda.empty_cache()
    return rows


def _length_rows(cfg: dict[str, Any], device: torch.device, length: int) -> list[dict[str, Any]]:
    from flux_kernels.block_select import block_density

    from flux.bench import DENSE_BACKENDS, _dense_variants, try_time

    pcfg, bb = cfg["patterns"], cfg["backbone"]
    heads, kv_heads, head_dim = bb["num_attention_heads"], bb["num_key_value_heads"], bb["head_dim"]
    dtype = getattr(torch, cfg["dtype"])
    warm, reps = int(pcfg["warmup"]), int(pcfg["repeats"])
    scale = head_dim ** -0.5
    gen = torch.Generator(device=device).manual_seed(int(cfg["seed"]) + length)
    q = torch.randn(1, length, heads, head_dim, device=device, dtype=dtype, generator=gen).transpose(1, 2)
    k = torch.randn(1, kv_heads, length, head_dim, device=device, dtype=dtype, generator=gen)
    v = torch.randn(1, kv_heads, length, head_dim, device=device, dtype=dtype, generator=gen)
    dense = {name: try_time(fn, warm, reps) for name, fn in _dense_variants(q, k, v).items()}
    timed = [(ms, name) for name, ms in dense.items() if isinstance(ms, float) and name in (*DENSE_BACKENDS, "auto")]
    dense_ms, dense_name = min(timed, default=(math.nan, "none"))
    base = {"length": length, "dense_ms": dense_ms, "dense_backend": dense_name}
    rows = []
    for name in pcfg["names"]:
        pattern = build_bench_pattern(pcfg, name)
        variants = [pattern]
        if isinstance(pattern, XAttentionPattern):
            variants = [dataclasses.replace(pattern, density=float(d)) for d in pcfg["xattn_densities"]]
        for variant in variants:
            row = {"pattern": name, **base, "params": variant.describe()}
            if isinstance(variant, XAttentionPattern):
                keep = variant.select(q, k, None, scale, "triton")
                row["density"] = block_density(keep, None, variant.block_size, length)
                del keep
                row["scoring_ms"] = try_time(lambda p=variant: p.select(q, k, None, scale, "triton"), warm, reps)
            else:
                row["density"] = positional_pair_density(variant, length)
            row["attn_ms"] = try_time(lambda p=variant: p.prefill(q, k, v, None, scale, "triton"), warm, reps)
            rows.append(_with_speedup(row))
    return rows


def add_all_sa_ttft(rows: list[dict[str, Any]], cfg: dict[str, Any], model: torch.nn.Module,
                    device: torch.device) -> None:
    """`ttft_ms_all_sa` on every row: whole-model time to first token of `FluxModel.generate` (the engine) on a
    random prompt of the row's length with every layer on the row's pattern (its density, for xattn rows)."""
    from flux.attention.patterns import pattern_from_description
    from flux.backbone import Backbone, _ByteTokenizer
    from flux.model import FluxModel

    backbone = Backbone(model, _ByteTokenizer(model.config.vocab_size), "bench", "random weights")
    warmed: set[str] = set()
    for row in rows:
        pattern = pattern_from_description(row["params"])
        fm = FluxModel(backbone, pattern=pattern)
        gen = torch.Generator(device=device).manual_seed(int(cfg["seed"]) + row["length"])
        ids = torch.randint(0, model.config.vocab_size, (1, row["length"]), device=device, generator=gen)
        try:
            if pattern.name not in warmed:  # compile the pattern's kernels outside the timed call
                fm.generate(ids[:, :4096], plan="sparse", max_new_tokens=1, eos_token_id=[])
                warmed.add(pattern.name)
            res = fm.generate(ids, plan="sparse", max_new_tokens=1, eos_token_id=[])
            row["ttft_ms_all_sa"] = 1e3 * res.timings["ttft"]
        except (RuntimeError, ValueError) as err:
            row["ttft_ms_all_sa"] = f"error: {str(err).splitlines()[0][:160]}"
        torch.cuda.empty_cache()


def _with_speedup(row: dict[str, Any]) -> dict[str, Any]:
    ok = isinstance(row["attn_ms"], float) and isinstance(row["dense_ms"], float) and row["attn_ms"] > 0
    row["speedup_vs_dense"] = row["dense_ms"] / row["attn_ms"] if ok else None
    return row


def xattn_real_density(model: torch.nn.Module, prompts: Sequence[torch.Tensor],
                       pattern: XAttentionPattern) -> dict[str, Any]:
    """Block density XAttention's selection keeps on a model's real activations, per layer and overall.

    Runs each prompt (input ids [1, T], no padding) through `model` (a transformers causal LM) with a probe
    attention function that measures the selection on the layer's query/key states and then computes ordinary
    causal SDPA attention, so every layer sees the dense model's activations. Returns {"density": mean over
    prompts and layers weighted by causal blocks, "per_layer": [...], "pattern": pattern.describe(),
    "tokens": [T, ...]}.
    """
    from flux_kernels.block_select import block_layout
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import AttentionInterface

    totals: dict[int, list[float]] = {}

    def probe(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if query.shape[0] != 1:
            raise ValueError("xattn_real_density runs one unpadded prompt at a time")
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        keep = pattern.select(query, key, None, scale)
        candidates, _, _ = block_layout(None, 1, query.shape[2], pattern.block_size, keep.device)
        kept, total = float((keep & candidates).sum()), float(candidates.sum()) * keep.shape[1]
        acc = totals.setdefault(module.layer_idx, [0.0, 0.0])
        acc[0], acc[1] = acc[0] + kept, acc[1] + total
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)

    AttentionInterface.register(PROBE_NAME, probe)
    previous = model.config._attn_implementation
    model.set_attn_implementation(PROBE_NAME)
    try:
        with torch.no_grad():
            for ids in prompts:
                model(input_ids=ids.view(1, -1).to(model.device), use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    layers = sorted(totals)
    per_layer = [totals[i][0] / totals[i][1] for i in layers]
    kept = sum(totals[i][0] for i in layers)
    total = sum(totals[i][1] for i in layers)
    return {"density": kept / total if total else math.nan, "per_layer": per_layer,
            "pattern": pattern.describe(), "tokens": [int(ids.numel()) for ids in prompts]}
