"""Prefill / decode / router speed of routed attention against the fastest dense path, on one CUDA GPU.

    python -m flux.bench                                   # Hydra (conf/bench.yaml), overrides as usual
    python -m flux.bench --no-hydra lengths=[8192,32768]   # same config and override syntax, no Hydra needed

Random weights from a backbone config (speed does not depend on the values). Sections, each switchable in the
config: kernel correctness at real shapes (``checks``), one attention layer alone (``kernels``), whole-model time to
first token (``prefill``), CUDA-graph decode (``decode``), and the router as a per-layer op (``router``). Every
figure is also a ratio to the dense baseline measured in the same run: SDPA's fastest backend for prefill (chosen
per length from the kernel section), the split-KV Triton kernel over a full cache for decode when it beats SDPA.
Writes ``bench.json``, ``table.md`` and ``speedup.png`` to ``output_dir``.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm

from flux.conf import CONFIG_MODULE, CONFIG_PATH
from flux.plan import spread_sa_layers

DENSE_BACKENDS = ("cudnn", "flash", "efficient")
GIB = 1024 ** 3


class BenchConfigError(ValueError):
    """A bench setting is invalid or an override does not name a config key."""


# ---------------------------------------------------------------------------------------------------- config
def load_plain_config(overrides: Sequence[str]) -> dict[str, Any]:
    """conf/bench.yaml (shipped as flux.conf) with Hydra-style ``a.b=value`` overrides, parsed by OmegaConf's
    dot-list parser (values typed as YAML) in struct mode: an override may only set a key the file has, and never
    replace a whole section."""
    cfg = OmegaConf.create(importlib.resources.files(CONFIG_MODULE).joinpath("bench.yaml").read_text())
    OmegaConf.set_struct(cfg, True)
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if "=" not in item or not key:
            raise BenchConfigError(f"override {item!r} is not key=value (e.g. lengths=[8192,32768])")
        if isinstance(OmegaConf.select(cfg, key, default=None), DictConfig):
            raise BenchConfigError(f"override {item!r}: {key!r} is a config section; set one of its keys instead, "
                                   f"e.g. {key}.{next(iter(OmegaConf.select(cfg, key)))}=...")
        try:
            cfg.merge_with_dotlist([item])
        except OmegaConfBaseException as err:
            reason = str(err.msg).splitlines()[0]
            raise BenchConfigError(f"override {item!r}: conf/bench.yaml has no key {key!r} ({reason})") from None
    return validate_config(OmegaConf.to_container(cfg, resolve=True))


def validate_config(cfg: dict[str, Any]) -> dict[str, Any]:
    for key in ("lengths", "batch_sizes"):
        values = cfg[key]
        if not isinstance(values, list) or not values or any(not isinstance(x, int) or x < 1 for x in values):
            raise BenchConfigError(f"{key}={cfg[key]} must be a non-empty list of positive integers")
    if any(not 0.0 <= float(f) <= 1.0 for f in cfg["sa_fractions"]):
        raise BenchConfigError(f"sa_fractions={cfg['sa_fractions']} must lie in [0, 1]")
    if cfg["dtype"] not in ("bfloat16", "float16"):
        raise BenchConfigError(f"dtype={cfg['dtype']!r}; the bench runs bfloat16 or float16")
    if int(cfg["sink"]) < 0 or int(cfg["window"]) < 1:
        raise BenchConfigError(f"need sink >= 0 and window >= 1, got {cfg['sink']}, {cfg['window']}")
    return cfg


def ideal_speedup(dense_ms: float, n_sa_layers: int, attn_layer_ms: float) -> float:
    """Speedup if SA layers' attention cost nothing and everything else stayed as in the dense run."""
    remaining = dense_ms - n_sa_layers * attn_layer_ms
    return dense_ms / remaining if remaining > 0 else math.inf


# ---------------------------------------------------------------------------------------------------- timing
def cuda_time(fn: Callable[[], Any], warmup: int, repeats: int) -> float:
    """Median milliseconds of fn over `repeats` CUDA-event-timed calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_time(fn: Callable[[], Any], calls: int = 20, repeats: int = 5) -> float:
    """Median device milliseconds per call of fn, replayed from a CUDA graph of `calls` back-to-back calls.

    For microsecond-scale ops event timing around a Python call measures the host launch path instead; a graph
    removes it, which is also how the decode step runs them."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return cuda_time(graph.replay, warmup=1, repeats=repeats) / calls


def try_time(fn: Callable[[], Any], warmup: int, repeats: int, graph: bool = False) -> float | str:
    """cuda_time (or graph_time), or the error's first line when a backend refuses the shape or memory runs out."""
    try:
        return graph_time(fn) if graph else cuda_time(fn, warmup, repeats)
    except (RuntimeError, ValueError, torch.OutOfMemoryError) as err:
        torch.cuda.empty_cache()
        return f"error: {str(err).splitlines()[0][:160]}"


def copy_bandwidth(device: torch.device, nbytes: int = 2 * GIB) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = cuda_time(lambda: dst.copy_(src), warmup=2, repeats=10)
    return 2 * nbytes / (ms / 1e3)


# ---------------------------------------------------------------------------------------------------- model
def build_model(cfg: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """Random-weight causal LM from a transformers config, created directly on the GPU in the bench dtype."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(cfg["backbone"])
    model_cfg = AutoConfig.for_model(spec.pop("model_type"), **spec)
    dtype = getattr(torch, cfg["dtype"])
    torch.manual_seed(int(cfg["seed"]))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_cfg, dtype=dtype)
    return model.eval().requires_grad_(False)


def weight_bytes_read_per_token(model: torch.nn.Module) -> int:
    """Weights a decode step must stream: all parameters except the input embedding table (one row is read)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    tied = embed.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    return total if tied else total - embed.numel() * embed.element_size()


# ---------------------------------------------------------------------------------------------------- sections
def run_checks(cfg: dict[str, Any], device: torch.device) -> list[dict[str, Any]]:
    """Kernels vs float64 references at real shapes; rows of long prefills are checked in slices."""
    from flux_kernels.decode import decode_attention
    from flux_kernels.reference import decode_attention_reference, streaming_attention_reference
    from flux_kernels.streaming_prefill import streaming_attention_prefill

    bb = cfg["backbone"]
    h, hkv, d = bb["num_attention_heads"], bb["num_key_value_heads"], bb["head_dim"]
    sink, window = int(cfg["sink"]), int(cfg["window"])
    dtype = getattr(torch, cfg["dtype"])
    results = []
    gen = torch.Generator(device=device).manual_seed(int(cfg["seed"]) + 1)
    for t, pads in ((32768, [0, 1000]), (7001, [5, 0])):
        q = torch.randn(2, h, t, d, device=device, dtype=dtype, generator=gen)
        k = torch.randn(2, hkv, t, d, device=device, dtype=dtype, generator=gen)
        v = torch.randn(2, hkv, t, d, device=device, dtype=dtype, generator=gen)
        pad = torch.tensor(pads, device=device)
        out = streaming_attention_prefill(q, k, v, sink, window, pad)
        worst = 0.0
        for lo in (0, t // 2 - 100, t - 300):
            hi = min(t, lo + 300)
            ref = streaming_attention_reference(q[:, :, lo:hi], k[:, :, :hi], v[:, :, :hi], pad, sink, window)
            got = out[:, :, lo:hi]
            worst = max(worst, float((got.double() - ref.double()).norm() / ref.double().norm()))
        results.append({"check": f"prefill T={t} pads={pads}", "rel_err": worst, "finite": bool(out.isfinite().all()),
                        "ok": worst < 2e-2 and bool(out.isfinite().all())})
        del q, k, v, out
    for t, batch in ((131072, 2), (2176, 8)):
        q = torch.randn(batch, h, 1, d, device=device, dtype=dtype, generator=gen)
        kc = torch.randn(batch, hkv, t, d, device=device, dtype=dtype, generator=gen)
        vc = torch.randn(batch, hkv, t, d, device=device, dtype=dtype, generator=gen)
        start = torch.randint(0, 50, (batch,), device=device, generator=gen)
        end = t - torch.randint(0, 50, (batch,), device=device, generator=gen)
        got = decode_attention(q, kc, vc, start, end)
        ref = decode_attention_reference(q, kc, vc, start, end)
        err = float((got.double() - ref.double()).norm() / ref.double().norm())
        results.append({"check": f"decode T={t} B={batch}", "rel_err": err, "ok": err < 2e-2})
        del q, kc, vc
    torch.cuda.empty_cache()
    return results


def _dense_variants(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, Callable[[], Any]]:
    from flux.fast_decode import sdpa_causal

    scale = q.shape[-1] ** -0.5
    variants = {name: (lambda name=name: sdpa_causal(q, k, v, scale, name)) for name in DENSE_BACKENDS}
    variants["auto"] = lambda: sdpa_causal(q, k, v, scale, "auto")
    return variants


def run_kernels(cfg: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Per-layer attention times. Prefill (event-timed): dense SDPA backends vs the Triton streaming kernel (and
    FlexAttention), plus a tile-config sweep at the longest length; decode (graph-timed): split-KV Triton vs SDPA
    over a full cache, the Triton kernel over an SA ring, and a launch-shape sweep at the longest length."""
    prefill_rows, decode_rows = [], []
    jobs = [(b, t) for t in cfg["lengths"] for b in cfg["batch_sizes"]]
    for b, t in tqdm(jobs, desc="kernels", file=sys.stdout):
        if b * t <= int(cfg["prefill"]["max_tokens"]):
            prefill_rows.append(_kernel_prefill_row(cfg, device, b, t))
        decode_rows.append(_kernel_decode_row(cfg, device, b, t))
        torch.cuda.empty_cache()
    return {"prefill": prefill_rows, "decode": decode_rows}


def _shape(cfg: dict[str, Any]) -> tuple[int, int, int, int, int, torch.dtype]:
    bb = cfg["backbone"]
    return (bb["num_attention_heads"], bb["num_key_value_heads"], bb["head_dim"], int(cfg["sink"]),
            int(cfg["window"]), getattr(torch, cfg["dtype"]))


def _kernel_prefill_row(cfg: dict[str, Any], device: torch.device, b: int, t: int) -> dict[str, Any]:
    from flux_kernels.streaming_prefill import streaming_attention_prefill

    h, hkv, d, sink, window, dtype = _shape(cfg)
    warm, reps = int(cfg["kernels"]["warmup"]), int(cfg["kernels"]["repeats"])
    q = torch.randn(b, t, h, d, device=device, dtype=dtype).transpose(1, 2)
    k = torch.randn(b, hkv, t, d, device=device, dtype=dtype)
    v = torch.randn(b, hkv, t, d, device=device, dtype=dtype)
    row: dict[str, Any] = {"batch": b, "length": t}
    for name, fn in _dense_variants(q, k, v).items():
        row[f"sdpa_{name}_ms"] = try_time(fn, warm, reps)
    row["triton_streaming_ms"] = try_time(lambda: streaming_attention_prefill(q, k, v, sink, window), warm, reps)
    row["triton_causal_ms"] = try_time(lambda: streaming_attention_prefill(q, k, v, 0, None), warm, reps)
    if b == 1 and t in cfg["kernels"]["flex_lengths"]:
        row["flex_streaming_ms"] = try_time(lambda: _flex_streaming(q, k, v, sink, window), warm, reps)
    if b == 1 and t == max(cfg["lengths"]):
        for bm, bn, nw, ns in cfg["kernels"]["prefill_configs"]:
            def tiled(bm: int = bm, bn: int = bn, nw: int = nw, ns: int = ns) -> torch.Tensor:
                return streaming_attention_prefill(q, k, v, sink, window, block_m=bm, block_n=bn, num_warps=nw,
                                                   num_stages=ns)
            row[f"triton_streaming_{bm}x{bn}_w{nw}_s{ns}_ms"] = try_time(tiled, warm, reps)
    best = min(((row[f"sdpa_{n}_ms"], n) for n in (*DENSE_BACKENDS, "auto") if isinstance(row[f"sdpa_{n}_ms"], float)),
               default=(math.nan, "auto"))
    row["dense_best_backend"], row["dense_best_ms"] = best[1], best[0]
    return row


def _kernel_decode_row(cfg: dict[str, Any], device: torch.device, b: int, t: int) -> dict[str, Any]:
    from flux_kernels.decode import decode_attention, plan_decode

    h, hkv, d, sink, window, dtype = _shape(cfg)
    q1 = torch.randn(b, h, 1, d, device=device, dtype=dtype)
    kc = torch.randn(b, hkv, t, d, device=device, dtype=dtype)
    vc = torch.randn(b, hkv, t, d, device=device, dtype=dtype)
    ring_k = torch.randn(b, hkv, sink + window, d, device=device, dtype=dtype)
    ring_v = torch.randn_like(ring_k)
    end = torch.full((b,), t, dtype=torch.int32, device=device)
    row: dict[str, Any] = {"batch": b, "length": t}
    row["triton_full_ms"] = try_time(lambda: decode_attention(q1, kc, vc, None, end), 0, 0, graph=True)
    row["triton_ring_ms"] = try_time(lambda: decode_attention(q1, ring_k, ring_v), 0, 0, graph=True)
    for name in ("flash", "auto"):
        row[f"sdpa_{name}_full_ms"] = try_time(lambda name=name: _sdpa_decode(q1, kc, vc, name), 0, 0, graph=True)
    if t == max(cfg["lengths"]):
        for bn, per_sm in cfg["kernels"]["decode_configs"]:
            plan = plan_decode(b, hkv, t, device, dtype, block_n=bn, programs_per_sm=per_sm)
            row[f"triton_full_bn{bn}_p{per_sm}_ms"] = try_time(
                lambda plan=plan: decode_attention(q1, kc, vc, None, end, plan=plan), 0, 0, graph=True)
    kv_bytes = 2 * kc.numel() * kc.element_size()
    if isinstance(row["triton_full_ms"], float):
        row["triton_full_gbps"] = kv_bytes / (row["triton_full_ms"] / 1e3) / 1e9
    return row


def _flex_streaming(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """flux's FlexAttention SA backend (compiled kernel, block mask cached per length) on an unpadded batch."""
    from flux.attention.backends import flex_sparse_attention
    from flux.attention.patterns import StreamingPattern

    return flex_sparse_attention(q, k, v, None, None, None, StreamingPattern(sink=sink, window=window),
                                 q.shape[-1] ** -0.5)


def _sdpa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if backend == "auto":
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    chosen = {"flash": SDPBackend.FLASH_ATTENTION}[backend]
    with sdpa_kernel([chosen]):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def _best_dense_backend(kernel_rows: list[dict[str, Any]], batch: int, length: int) -> tuple[str, float]:
    for row in kernel_rows:
        if row["batch"] == batch and row["length"] == length:
            return row["dense_best_backend"], row["dense_best_ms"]
    return "auto", math.nan


def run_prefill(model: torch.nn.Module, cfg: dict[str, Any], device: torch.device,
                kernel_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Whole-model time to first token per (batch, length, SA fraction); FA layers on the best dense backend."""
    layers = model.config.num_hidden_layers
    pcfg = cfg["prefill"]
    rows = []
    jobs = [(b, t, f) for t in cfg["lengths"] for b in cfg["batch_sizes"] for f in cfg["sa_fractions"]
            if b * t <= int(pcfg["max_tokens"])]
    for b, t, f in tqdm(jobs, desc="prefill", file=sys.stdout):
        backend, attn_ms = _best_dense_backend(kernel_rows, b, t)
        plan = spread_sa_layers(layers, float(f))
        row: dict[str, Any] = {"batch": b, "length": t, "sa_fraction": float(f), "sa_layers": sum(plan),
                               "fa_backend": backend, "dense_attn_layer_ms": attn_ms}
        try:
            row["ttft_ms"], row["peak_mem_gib"] = _time_prefill(model, cfg, device, plan, b, t, backend)
        except torch.OutOfMemoryError:
            row["ttft_ms"] = "oom"
        torch.cuda.empty_cache()
        rows.append(row)
    for row in rows:
        dense = next((r for r in rows if r["batch"] == row["batch"] and r["length"] == row["length"]
                      and r["sa_fraction"] == 0.0), None)
        if dense is None or not isinstance(dense["ttft_ms"], float) or not isinstance(row["ttft_ms"], float):
            continue
        row["speedup"] = dense["ttft_ms"] / row["ttft_ms"]
        ideal = ideal_speedup(dense["ttft_ms"], row["sa_layers"], row["dense_attn_layer_ms"])
        row["ideal_speedup"] = ideal
        row["fraction_of_ideal"] = row["speedup"] / ideal
        row["fraction_of_ideal_gain"] = (row["speedup"] - 1) / (ideal - 1) if ideal > 1 else None
    return rows


def _time_prefill(model: torch.nn.Module, cfg: dict[str, Any], device: torch.device, plan: list[bool], b: int,
                  t: int, backend: str) -> tuple[float, float]:
    """(median TTFT ms, peak GiB) of FastDecoder.prefill on random token ids."""
    from flux.fast_decode import FastDecoder

    pcfg = cfg["prefill"]
    dec = FastDecoder(model, plan, int(cfg["sink"]), int(cfg["window"]), b, t + 1, fa_prefill=backend,
                      mlp_chunk=int(pcfg["mlp_chunk"]))
    ids = torch.randint(0, model.config.vocab_size, (b, t), device=device)
    torch.cuda.reset_peak_memory_stats(device)
    ms = cuda_time(lambda: dec.prefill(ids), int(pcfg["warmup"]), int(pcfg["repeats"]))
    return ms, torch.cuda.max_memory_allocated(device) / GIB


def _kv_bytes_per_sample(plan: Sequence[bool], capacity: int, ring: int, hkv: int, d: int, elem: int) -> int:
    return sum(2 * hkv * d * elem * (ring if sa else capacity) for sa in plan)


def run_decode(model: torch.nn.Module, cfg: dict[str, Any], device: torch.device,
               bandwidth: float) -> list[dict[str, Any]]:
    """CUDA-graph decode per (batch, length, SA fraction), plus each plan at the largest batch that fits."""
    from flux.fast_decode import FastDecoder

    dcfg = cfg["decode"]
    bb = cfg["backbone"]
    layers, hkv, d = model.config.num_hidden_layers, bb["num_key_value_heads"], bb["head_dim"]
    sink, window = int(cfg["sink"]), int(cfg["window"])
    ring = sink + window
    elem = torch.finfo(getattr(torch, cfg["dtype"])).bits // 8
    steps, warm = int(dcfg["steps"]), int(dcfg["warmup"])
    # Slots for every step a config runs: warm-up, timed windows, one eager window, a profiled window, capture.
    extra = warm + (int(dcfg["repeats"]) + 1) * steps + 8
    weights_read = weight_bytes_read_per_token(model)
    total_mem = torch.cuda.get_device_properties(device).total_memory
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    budget = total_mem - model_bytes - float(dcfg["memory_margin_gib"]) * GIB

    jobs = []
    for t in cfg["lengths"]:
        capacity = t + extra
        for f in cfg["sa_fractions"]:
            plan = spread_sa_layers(layers, float(f))
            per_sample = _kv_bytes_per_sample(plan, capacity, ring, hkv, d, elem)
            fit = max(0, min(int(dcfg["max_batch_cap"]), int(budget // per_sample)))
            for b in cfg["batch_sizes"]:
                jobs.append((t, f, b, "fixed"))
            if dcfg["max_batch"] and fit >= 1:
                jobs.append((t, f, fit, "max"))
    rows: list[dict[str, Any]] = []
    profiles: list[str] = []
    for t, f, b, kind in tqdm(jobs, desc="decode", file=sys.stdout):
        plan = spread_sa_layers(layers, float(f))
        capacity = t + extra
        row: dict[str, Any] = {"batch": b, "length": t, "sa_fraction": float(f), "sa_layers": sum(plan),
                               "batch_kind": kind}
        try:
            dec = FastDecoder(model, plan, sink, window, b, capacity)
            for kc, vc in dec.caches:
                kc.normal_()
                vc.normal_()
            dec.start_from_filled_cache(torch.randint(0, model.config.vocab_size, (b,), device=device), t)
            dec.capture()
            dec.decode(warm)
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            ms = statistics.median(_decode_window(dec, steps, True) for _ in range(int(dcfg["repeats"])))
            if b == 1 and kind == "fixed" and float(f) in (0.0, 0.5):
                row["eager_ms_per_token"] = _decode_window(dec, steps, False)
            if b == 1 and kind == "fixed" and t == max(cfg["lengths"]) and float(f) in (0.0, 0.5):
                profiles.append(_profile_decode(dec, f"batch 1, length {t}, SA fraction {f}"))
            live_kv = sum(2 * hkv * d * elem * b * (min(t, ring) if sa else t) for sa in plan)
            limit_ms = (weights_read + live_kv) / bandwidth * 1e3
            row.update({"ms_per_token": ms, "tokens_per_s": b * 1e3 / ms, "kv_cache_gib": dec.kv_bytes / GIB,
                        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / GIB,
                        "bandwidth_limit_ms": limit_ms, "over_limit": ms / limit_ms})
            del dec
        except torch.OutOfMemoryError:
            row["ms_per_token"] = "oom"
        torch.cuda.empty_cache()
        rows.append(row)
    for row in rows:
        dense = next((r for r in rows if r["length"] == row["length"] and r["sa_fraction"] == 0.0
                      and r["batch"] == row["batch"] and isinstance(r.get("ms_per_token"), float)), None)
        dense_max = next((r for r in rows if r["length"] == row["length"] and r["sa_fraction"] == 0.0
                          and r["batch_kind"] == "max" and isinstance(r.get("ms_per_token"), float)), None)
        if not isinstance(row.get("ms_per_token"), float):
            continue
        if dense is not None:
            row["throughput_vs_dense_same_batch"] = row["tokens_per_s"] / dense["tokens_per_s"]
        if dense_max is not None:
            row["throughput_vs_dense_max_batch"] = row["tokens_per_s"] / dense_max["tokens_per_s"]
    Path(cfg["output_dir"]).mkdir(parents=True, exist_ok=True)
    (Path(cfg["output_dir"]) / "decode_profile.txt").write_text("\n\n".join(profiles))
    return rows


def _decode_window(dec: Any, steps: int, use_graph: bool) -> float:
    """Milliseconds per decode step over `steps` consecutive steps (CUDA events around the whole window)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    dec.decode(steps, use_graph=use_graph)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / steps


def _profile_decode(dec: Any, title: str) -> str:
    """Per-kernel device time inside replayed decode steps (torch.profiler), to see where the step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    steps = 4
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        dec.decode(steps, use_graph=True)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
    return f"## {title} ({steps} steps)\n{table}"


def run_router(cfg: dict[str, Any], model: torch.nn.Module, device: torch.device) -> list[dict[str, Any]]:
    """flux.router.LayerRouter's per-layer decision on real-size query states: the op as called (CUDA events, so
    host launch time shows), its device time alone (CUDA-graph replay), and wall time including the host read of
    the decision (the dispatcher's one sync per layer). The `fused` variant is the same router MLP fed by
    span indices computed once per forward and the one-launch pooling kernel (flux_kernels.router_pool)."""
    from flux_kernels.router_pool import pool_spans

    from flux.router import LayerRouter, RouterConfig, span_indices

    rcfg = cfg["router"]
    bb = cfg["backbone"]
    h, d = bb["num_attention_heads"], bb["head_dim"]
    layers = model.config.num_hidden_layers
    router = LayerRouter(layers, d, RouterConfig(pool_size=int(rcfg["pool_size"]), hidden=list(rcfg["hidden"])))
    router = router.to(device).eval()
    plan = router.as_plan()
    dtype = getattr(torch, cfg["dtype"])
    layer = layers // 2
    mlp = router.mlps[layer]
    rows = []
    for t in cfg["lengths"]:
        q = torch.randn(1, t, h, d, device=device, dtype=dtype).transpose(1, 2)
        index, ok = span_indices(None, None, 1, t, int(rcfg["pool_size"]), device)
        ok = ok.to(torch.int8)
        variants = {"router": lambda q=q: plan.decide(layer, q, None).sa,
                    "router_fused": lambda q=q, index=index, ok=ok: (
                        mlp(pool_spans(q, index, ok)).float().softmax(dim=-1)[:, 1] > 0.5)}
        row: dict[str, Any] = {"length": t}
        with torch.no_grad():
            torch.testing.assert_close(pool_spans(q, index, ok), _stock_pool(q, index, ok), atol=1e-3, rtol=1e-3)
            for name, fn in variants.items():
                row[f"{name}_op_ms"] = cuda_time(fn, 5, int(rcfg["repeats"]))
                row[f"{name}_graph_ms"] = graph_time(fn)
                row[f"{name}_with_sync_ms"] = _wall_with_sync(fn, int(rcfg["repeats"]))
        rows.append(row)
    return rows


def _stock_pool(q: torch.Tensor, index: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    from flux.router import pool_queries

    return pool_queries(q, index, ok.bool())


def _wall_with_sync(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    """Median wall milliseconds of fn plus the host read of its decision, starting from an idle GPU."""
    walls = []
    for _ in range(repeats + 5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        bool(fn().all())
        walls.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(walls[5:])


# ---------------------------------------------------------------------------------------------------- output
def write_outputs(result: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(result, indent=1, default=str))
    (out_dir / "table.md").write_text(render_tables(result))
    plot_speedups(result, out_dir / "speedup.png")


def _fmt(x: Any, digits: int = 2) -> str:
    return f"{x:.{digits}f}" if isinstance(x, float) and math.isfinite(x) else str(x) if x is not None else "-"


def render_tables(result: dict[str, Any]) -> str:
    lines = [f"GPU: {result['env']['gpu']}; copy bandwidth {result['env']['copy_bw_tbps']:.2f} TB/s", ""]
    if result.get("prefill"):
        lines += ["| batch | length | SA frac | TTFT ms | speedup | ideal | of ideal | peak GiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in result["prefill"]:
            lines.append(f"| {r['batch']} | {r['length']} | {r['sa_fraction']} | {_fmt(r['ttft_ms'], 1)} | "
                         f"{_fmt(r.get('speedup'))} | {_fmt(r.get('ideal_speedup'))} | "
                         f"{_fmt(r.get('fraction_of_ideal'))} | {_fmt(r.get('peak_mem_gib'), 1)} |")
        lines.append("")
    if result.get("decode"):
        lines += [("| batch | kind | length | SA frac | ms/token | tok/s | vs dense (same B) | vs dense (max B) | "
                   "x BW limit | KV GiB |"), "|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["decode"]:
            lines.append(f"| {r['batch']} | {r['batch_kind']} | {r['length']} | {r['sa_fraction']} | "
                         f"{_fmt(r.get('ms_per_token'))} | {_fmt(r.get('tokens_per_s'), 0)} | "
                         f"{_fmt(r.get('throughput_vs_dense_same_batch'))} | "
                         f"{_fmt(r.get('throughput_vs_dense_max_batch'))} | {_fmt(r.get('over_limit'))} | "
                         f"{_fmt(r.get('kv_cache_gib'), 1)} |")
        lines.append("")
    if result.get("router"):
        lines += ["| length | router | ms/layer eager | device (CUDA graph) | eager + host sync |",
                  "|---|---|---|---|---|"]
        for r in result["router"]:
            for name in ("router", "router_fused"):
                if f"{name}_op_ms" in r:
                    lines.append(f"| {r['length']} | {name} | {_fmt(r[f'{name}_op_ms'], 4)} | "
                                 f"{_fmt(r.get(f'{name}_graph_ms'), 4)} | {_fmt(r.get(f'{name}_with_sync_ms'), 4)} |")
    return "\n".join(lines) + "\n"


def plot_speedups(result: dict[str, Any], path: Path) -> None:
    """Prefill speedup and decode throughput ratio vs length, one line per SA fraction (batch 1 / batch 8)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = ((axes[0], result.get("prefill") or [], "speedup", "prefill TTFT speedup (batch 1)", 1, "fixed"),
              (axes[1], result.get("decode") or [], "throughput_vs_dense_same_batch",
               "decode throughput vs dense (batch 8)", 8, "fixed"))
    for ax, rows, key, title, batch, kind in panels:
        for frac in sorted({r["sa_fraction"] for r in rows}):
            pts = sorted((r["length"], r[key]) for r in rows if r["sa_fraction"] == frac and r["batch"] == batch
                         and r.get("batch_kind", "fixed") == kind and isinstance(r.get(key), float))
            if pts:
                ax.plot([p[0] // 1024 for p in pts], [p[1] for p in pts], marker="o", label=f"SA {frac:.2f}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (k tokens)")
        ax.set_title(title)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- entry
def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run the configured sections and write the outputs; returns the result dict."""
    if not torch.cuda.is_available():
        print("flux.bench: no CUDA device found. The benchmark times GPU kernels and CUDA graphs; run it on a "
              "machine with an NVIDIA GPU (torch.cuda.is_available() must be True).", file=sys.stderr)
        raise SystemExit(2)
    cfg = validate_config(cfg)
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    props = torch.cuda.get_device_properties(device)
    bw = copy_bandwidth(device)
    result: dict[str, Any] = {
        "env": {"gpu": props.name, "total_mem_gib": props.total_memory / GIB, "sms": props.multi_processor_count,
                "copy_bw_tbps": bw / 1e12, "torch": torch.__version__, "command": " ".join(sys.argv)},
        "config": cfg,
    }
    out_dir = Path(cfg["output_dir"])
    seconds = result["env"]["section_seconds"] = {}
    print(f"flux.bench on {props.name}: copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    tick = time.perf_counter()
    if cfg["checks"]["enabled"]:
        result["checks"] = run_checks(cfg, device)
        for c in result["checks"]:
            print(f"check {c['check']}: rel_err {c['rel_err']:.2e} {'ok' if c['ok'] else 'FAILED'}", flush=True)
        seconds["checks"], tick = time.perf_counter() - tick, time.perf_counter()
    kernel_rows: list[dict[str, Any]] = []
    if cfg["kernels"]["enabled"]:
        result["kernels"] = run_kernels(cfg, device)
        kernel_rows = result["kernels"]["prefill"]
        write_outputs(result, out_dir)
        seconds["kernels"], tick = time.perf_counter() - tick, time.perf_counter()
    model = build_model(cfg, device)
    result["env"]["weights_gib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / GIB
    seconds["model_init"], tick = time.perf_counter() - tick, time.perf_counter()
    if cfg["prefill"]["enabled"]:
        result["prefill"] = run_prefill(model, cfg, device, kernel_rows)
        write_outputs(result, out_dir)
        seconds["prefill"], tick = time.perf_counter() - tick, time.perf_counter()
    if cfg["decode"]["enabled"]:
        result["decode"] = run_decode(model, cfg, device, bw)
        write_outputs(result, out_dir)
        seconds["decode"], tick = time.perf_counter() - tick, time.perf_counter()
    if cfg["router"]["enabled"]:
        result["router"] = run_router(cfg, model, device)
        seconds["router"] = time.perf_counter() - tick
    write_outputs(result, out_dir)
    print(render_tables(result), flush=True)
    return result


def _hydra_main(argv: list[str]) -> None:
    import hydra
    from omegaconf import OmegaConf

    sys.argv = [sys.argv[0], *argv]

    @hydra.main(version_base=None, config_path=CONFIG_PATH, config_name="bench")
    def _entry(conf) -> None:
        run(OmegaConf.to_container(conf, resolve=True))

    _entry()


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m flux.bench", add_help=True,
                                     description="Prefill/decode/router speed vs the fastest dense path (GPU).")
    parser.add_argument("--no-hydra", action="store_true", help="read conf/bench.yaml directly (no Hydra needed)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lengths=[8192,32768]")
    import importlib.util

    if "--no-hydra" in args or importlib.util.find_spec("hydra") is None:
        ns = parser.parse_args(args)
        try:
            cfg = load_plain_config(ns.overrides)
        except BenchConfigError as err:
            parser.error(str(err))
        run(cfg)
    else:
        _hydra_main(args)


if __name__ == "__main__":
    main()
