"""Speed of flux on one CUDA GPU: the kernels alone, and `FluxModel.generate` end to end against dense baselines.

    python -m flux.bench                                   # Hydra (conf/bench.yaml), overrides as usual
    python -m flux.bench --no-hydra lengths=[8192,32768]   # same config and override syntax, no Hydra needed

Random weights from a backbone config (speed does not depend on the values). Sections, each switchable in the
config: kernel correctness at real shapes (``checks``), one attention layer alone (``kernels``: dense SDPA backends
vs the Triton kernels), ``generate`` (the product path: `FluxModel.generate` with a router in the loop, fixed
plans, the engine's dense plan and transformers' own `generate`; see flux/bench_generate.py), and the router as a
per-layer op (``router``). Every figure is also a ratio to a dense baseline measured in the same run.
Writes ``bench.json``, ``table.md`` and ``speedup.png`` to ``output_dir``.
"""

from __future__ import annotations

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
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm

from flux.conf import CONFIG_MODULE, CONFIG_PATH
from flux.errors import ArgumentParser, FluxUserError, report_user_errors, run_cli

DENSE_BACKENDS = ("cudnn", "flash", "efficient")
GIB = 1024 ** 3


class BenchConfigError(FluxUserError):
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
        node = OmegaConf.select(cfg, key, default=None)
        if isinstance(node, DictConfig) and len(node):
            raise BenchConfigError(f"override {item!r}: {key!r} is a config section; set one of its keys instead, "
                                   f"e.g. {key}.{next(iter(node))}=...")
        if isinstance(node, DictConfig):  # an empty map of free-form settings (e.g. patterns.params): fill it
            with open_dict(cfg):
                cfg.merge_with(OmegaConf.from_dotlist([item]))
            continue
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
    if cfg["patterns"]["enabled"]:
        from flux.bench_patterns import PatternBenchError, check_patterns_config

        try:
            check_patterns_config(cfg["patterns"])
        except PatternBenchError as err:
            raise BenchConfigError(str(err)) from None
    targets = cfg["generate"]["sa_targets"]
    if not targets or any(not 0.0 <= float(f) <= 1.0 for f in targets):
        raise BenchConfigError(f"generate.sa_targets={targets} must be a non-empty list of fractions in [0, 1]")
    for job in cfg["generate"]["jobs"]:
        if job.get("batch") != "max" and (not isinstance(job.get("batch"), int) or job["batch"] < 1):
            raise BenchConfigError(f"generate job {job}: batch must be a positive integer or 'max'")
        if not isinstance(job.get("length"), int) or job["length"] < 1 or not job.get("plans"):
            raise BenchConfigError(f"generate job {job}: needs a positive integer length and a list of plans")
        for plan in job["plans"]:
            name, _, at = str(plan).partition("@")
            if name not in ("dense", "hf", "hf_static", "router", "static", "replay") or (
                    at and not 0 <= float(at) <= 1):
                raise BenchConfigError(f"generate job {job}: unknown plan {plan!r}; use dense, hf, hf_static, "
                                       "router[@f], static[@f] or replay[@f] with f in [0, 1]")
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


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, backend: str) -> torch.Tensor:
    """Causal SDPA with GQA on a chosen backend ('auto' lets torch pick, as the engine does)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gqa = q.shape[1] != k.shape[1]
    if backend == "auto":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    chosen = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
              "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[backend]
    if backend == "cudnn" and gqa:
        # the forced cuDNN path expands kv heads (a copy, counted in its time) rather than rely on that backend's
        # GQA support; 'auto' passes enable_gqa and lets torch choose
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        gqa = False
    with sdpa_kernel([chosen]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)


def _dense_variants(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, Callable[[], Any]]:
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
        if b * t <= int(cfg["kernels"]["prefill_max_tokens"]):
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
    if t in cfg["kernels"]["decode_sweep_lengths"]:
        for bn, per_sm, min_blocks in cfg["kernels"]["decode_configs"]:
            plan = plan_decode(b, hkv, t, device, dtype, block_n=bn, programs_per_sm=per_sm, min_blocks=min_blocks)
            row[f"triton_full_bn{bn}_p{per_sm}_m{min_blocks}_ms"] = try_time(
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
    rows = (result.get("generate") or {}).get("rows") or []
    if rows:
        lines += [("| batch | length | plan | SA frac | TTFT ms | decode ms/token | tokens/s | x BW limit | KV GiB | "
                   "peak GiB | vs dense | vs hf |"), "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            plan = r["plan"] + (f"@{r['target']}" if r.get("target") is not None else "")
            if "error" in r:
                lines.append(f"| {r['batch']} | {r['length']} | {plan} | {r['error']} |")
                continue
            lines.append(f"| {r['batch']} | {r['length']} | {plan} | {_fmt(r.get('sa_fraction'))} | "
                         f"{_fmt(r.get('ttft_ms'), 1)} | {_fmt(r.get('decode_ms_per_token'))} | "
                         f"{_fmt(r.get('tokens_per_s'), 0)} | {_fmt(r.get('x_bw_limit'))} | {_fmt(r.get('kv_gib'))} | "
                         f"{_fmt(r.get('peak_gib'), 1)} | {_fmt(r.get('speedup_vs_dense'))} | "
                         f"{_fmt(r.get('speedup_vs_hf'))} |")
        lines.append("")
    prow = (result.get("patterns") or {}).get("rows") or []
    if prow:
        lines += ["| pattern | length | density | attention ms | dense ms | speedup | scoring ms | TTFT ms, all SA |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in prow:
            lines.append(f"| {r['pattern']} | {r['length']} | {_fmt(r.get('density'), 3)} | {_fmt(r.get('attn_ms'))} | "
                         f"{_fmt(r.get('dense_ms'))} | {_fmt(r.get('speedup_vs_dense'))} | "
                         f"{_fmt(r.get('scoring_ms'))} | {_fmt(r.get('ttft_ms_all_sa'), 1)} |")
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
    """generate rows: TTFT speedup over the engine's dense plan (batch 1) and decode throughput ratio (batch > 1)
    vs length, one line per plan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in ((result.get("generate") or {}).get("rows") or []) if "error" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, single, title in ((axes[0], True, "TTFT speedup vs engine dense (batch 1)"),
                              (axes[1], False, "decode tokens/s vs engine dense (batch > 1)")):
        labels = sorted({(r["plan"], r.get("target") or 0.0) for r in rows if r["plan"] != "dense"})
        for plan, target in labels:
            pts = sorted((r["length"], r["speedup_vs_dense"]) for r in rows
                         if r["plan"] == plan and (r.get("target") or 0.0) == target
                         and (r["batch"] == 1 and r.get("batch_kind", "fixed") == "fixed") == single
                         and isinstance(r.get("speedup_vs_dense"), float))
            if pts:
                label = plan + (f"@{target}" if plan != "hf" else "")
                ax.plot([p[0] // 1024 for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xlabel("context length (k tokens)")
        ax.set_title(title)
        ax.axhline(1.0, color="grey", lw=0.8)
        if ax.get_legend_handles_labels()[0]:
            ax.set_xscale("log", base=2)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- entry
def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run the configured sections and write the outputs; returns the result dict."""
    cfg = validate_config(cfg)  # a bad setting is reported on any machine, before the GPU check
    if not torch.cuda.is_available():
        raise FluxUserError("flux.bench found no CUDA device; the benchmark times GPU kernels and CUDA graphs, so "
                            "run it on a machine with an NVIDIA GPU (torch.cuda.is_available() must be True)")
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
    if cfg["kernels"]["enabled"]:
        result["kernels"] = run_kernels(cfg, device)
        write_outputs(result, out_dir)
        seconds["kernels"], tick = time.perf_counter() - tick, time.perf_counter()
    model = build_model(cfg, device)
    result["env"]["weights_gib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / GIB
    seconds["model_init"], tick = time.perf_counter() - tick, time.perf_counter()
    if cfg["patterns"]["enabled"]:
        from flux.bench_patterns import add_all_sa_ttft, run_patterns

        rows = run_patterns(cfg, device)
        add_all_sa_ttft(rows, cfg, model, device)
        result["patterns"] = {"rows": rows}
        write_outputs(result, out_dir)
        seconds["patterns"], tick = time.perf_counter() - tick, time.perf_counter()
    if cfg["generate"]["enabled"]:
        from flux.bench_generate import run_generate

        result["generate"] = {"rows": run_generate(cfg, model, device, bw)}
        write_outputs(result, out_dir)
        seconds["generate"], tick = time.perf_counter() - tick, time.perf_counter()
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
    @report_user_errors
    def _entry(conf) -> None:
        run(OmegaConf.to_container(conf, resolve=True))

    _entry()


def _main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    parser = ArgumentParser(prog="python -m flux.bench", add_help=True,
                            description="Prefill/decode/router speed vs the fastest dense path (GPU).")
    parser.add_argument("--no-hydra", action="store_true", help="read conf/bench.yaml directly (no Hydra needed)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lengths=[8192,32768]")
    import importlib.util

    if "--no-hydra" in args or importlib.util.find_spec("hydra") is None:
        ns = parser.parse_args(args)
        run(load_plain_config(ns.overrides))
    else:
        _hydra_main(args)


def main(argv: list[str] | None = None) -> None:
    run_cli(_main, argv)


if __name__ == "__main__":
    main()
