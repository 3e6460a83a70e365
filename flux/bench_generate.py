"""flux.bench's `generate` section: `FluxModel.generate` end to end, the path users run, router included.

Each row is one call of `FluxModel.generate` on random prompts (random-weight model: speed does not depend on the
values) and reads the call's own timings: TTFT (call to first token, the router deciding in the loop), CUDA-graph
capture, and decode (the remaining steps). Plans:
  * `router@t`: a LayerRouter with random weights whose threshold is calibrated on the job's own prompts (up to
    `calib_tokens` of them) so that a fraction t of (sample, layer) decisions are SA; decisions differ per sample
    at batch > 1. Ω is the variable this benchmark controls, so it is set on the prompts being timed (a threshold
    from other random prompts missed 0.5 by up to 0.14: a random router's scores move with the prompt); the timed
    call still runs the router in the loop, and its Ω is reported as measured;
  * `static@t`: a fixed plan with the same number of SA layers as the router row of the same job (spread over
    depth): the fixed-plan TTFT the router is compared with;
  * `replay@t`: the router row's own decisions given back as a fixed [batch, layers] plan: the same attention
    work without the router, so the TTFT difference is the router's cost;
  * `dense`: the engine with every layer FA, the baseline of speedup_vs_dense;
  * `hf` / `hf_static`: transformers' own `model.generate` (SDPA) on the same weights, with its default dynamic
    cache / with its static cache (which transformers compiles; timed on a second call, after compilation).
A job whose batch is `max` runs one prompt with `num_return_sequences` = the largest count whose KV fits, per plan
(the KV per continuation is read off the batch-1 row of the same length and plan).
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from typing import Any

import torch
from tqdm import tqdm

from flux.plan import spread_sa_layers

GIB = 1024 ** 3


def make_router(num_layers: int, head_dim: int, cfg: dict[str, Any], device: torch.device):
    """A random-weight router whose decisions vary per input (last layer re-initialised with a wide spread)."""
    from flux.router import LayerRouter, RouterConfig

    router = LayerRouter(num_layers, head_dim, RouterConfig(pool_size=int(cfg["pool_size"]),
                                                            hidden=list(cfg["hidden"]), init_fa_bias=0.0))
    gen = torch.Generator().manual_seed(int(cfg.get("seed", 0)))
    with torch.no_grad():
        for mlp in router.mlps:
            mlp[-1].weight.normal_(0.0, 1.0, generator=gen)
            mlp[-1].bias.zero_()
    return router.to(device).eval()


def calibrate(fm, router, targets: list[float], ids: torch.Tensor, tokens: int) -> dict[float, float]:
    """Threshold on P(SA) per target sparsity, from the router's probabilities on the first
    max(1, tokens // length) of the job's prompts `ids` (one routed prefill, the router at its default threshold)."""
    from flux.router import calibrate_threshold

    batch = max(1, min(ids.shape[0], tokens // ids.shape[1]))
    plan = router.as_plan()
    fm.generate(ids[:batch], plan=plan, max_new_tokens=1, eos_token_id=[])
    p_sa = torch.stack([1 - plan.soft[i] for i in range(router.num_layers)], dim=1)
    # the ends are absolute: every decision SA (P(SA) > 0) or none, whatever prompts come later
    return {t: 0.0 if t >= 1.0 else 1.0 if t <= 0.0 else calibrate_threshold(p_sa, t) for t in targets}


def _live_kv_bytes(decisions: torch.Tensor, length: int, new: int, ring: int, token_bytes: int) -> float:
    """KV a decode step reads on average over the run: FA layers their whole history, SA layers their ring."""
    fa = (~decisions).sum().item()
    sa = decisions.sum().item()
    return token_bytes * (fa * (length + new / 2) + sa * min(ring, length + new / 2))


def _sync_and_reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else 0.0


def _engine_row(fm, plan, ids: torch.Tensor, new: int, copies: int, ctx: dict[str, Any]) -> dict[str, Any]:
    device = ids.device
    _sync_and_reset_peak(device)
    kw = {"do_sample": True, "seed": 0, "num_return_sequences": copies} if copies > 1 else {}
    res = fm.generate(ids, plan=plan, max_new_tokens=new, eos_token_id=[], **kw)
    t = res.timings
    rows = ids.shape[0] * copies
    decode_ms = 1e3 * t["decode"] / max(1.0, t["decode_steps"])
    live = _live_kv_bytes(res.decisions, ids.shape[1], new, ctx["ring"], ctx["token_bytes"])
    limit_ms = 1e3 * (ctx["weights_read"] + live) / ctx["bandwidth"]
    return {"ttft_ms": 1e3 * t["ttft"], "capture_ms": 1e3 * t.get("capture", 0.0), "decode_ms_per_token": decode_ms,
            "tokens_per_s": rows * 1e3 / decode_ms, "sa_fraction": float(res.decisions.float().mean()),
            "x_bw_limit": decode_ms / limit_ms, "kv_gib": res.kv_bytes / GIB,
            "kv_gib_per_sample": res.kv_bytes_per_sample[0] / GIB,
            "peak_gib": _peak_gib(device),
            "weights_plus_kv_gib": (ctx["weights_bytes"] + res.kv_bytes) / GIB,
            "decisions": res.decisions}


def _hf_row(model, ids: torch.Tensor, new: int, static: bool) -> dict[str, Any]:
    """transformers' generate with SDPA, its default dynamic cache or (static=True) its static cache, with which
    transformers compiles the decode step: that variant runs once untimed first, so compilation is not counted.
    TTFT from a streamer's first new token."""
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.calls: list[float] = []

        def put(self, value) -> None:
            if ids.is_cuda:
                torch.cuda.synchronize()
            self.calls.append(time.perf_counter())

        def end(self) -> None:
            if ids.is_cuda:
                torch.cuda.synchronize()
            self.calls.append(time.perf_counter())

    previous = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        device = ids.device
        _sync_and_reset_peak(device)
        kw = {"attention_mask": torch.ones_like(ids), "max_new_tokens": new, "min_new_tokens": new,
              "do_sample": False, "pad_token_id": 0, "cache_implementation": "static" if static else "dynamic"}
        if static:
            model.generate(input_ids=ids, **kw)
            _sync_and_reset_peak(device)
        clock = Clock()
        start = time.perf_counter()
        out = model.generate(input_ids=ids, streamer=clock, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        end = time.perf_counter()
    finally:
        model.set_attn_implementation(previous)
    steps = out.shape[1] - ids.shape[1] - 1
    row: dict[str, Any] = {"peak_gib": _peak_gib(device), "sa_fraction": 0.0}
    if len(clock.calls) >= 3:  # the prompt, the first new token, ..., end
        ttft = clock.calls[1] - start
        decode_ms = 1e3 * (end - clock.calls[1]) / max(1, steps)
        row.update(ttft_ms=1e3 * ttft, decode_ms_per_token=decode_ms, tokens_per_s=ids.shape[0] * 1e3 / decode_ms)
    else:
        row.update(total_ms=1e3 * (end - start), tokens_per_s=ids.shape[0] * (steps + 1) / (end - start))
    return row


def _plans(spec: list[str], targets: list[float]) -> list[tuple[str, float | None]]:
    """`router` expands to every target; `router@0.5` names one."""
    out = []
    for item in spec:
        name, _, at = item.partition("@")
        if name in ("router", "static", "replay") and not at:
            out += [(name, t) for t in targets]
        else:
            out.append((name, float(at) if at else None))
    return out


def run_generate(cfg: dict[str, Any], model: torch.nn.Module, device: torch.device,
                 bandwidth: float) -> list[dict[str, Any]]:
    from flux.attention.patterns import StreamingPattern
    from flux.backbone import Backbone, _ByteTokenizer
    from flux.bench import weight_bytes_read_per_token
    from flux.model import FluxModel

    g = cfg["generate"]
    layers = model.config.num_hidden_layers
    bb = cfg["backbone"]
    elem = torch.finfo(getattr(torch, cfg["dtype"])).bits // 8
    token_bytes = 2 * bb["num_key_value_heads"] * bb["head_dim"] * elem
    backbone = Backbone(model, _ByteTokenizer(model.config.vocab_size), "bench", "random weights")
    router = make_router(layers, bb["head_dim"], cfg["router"], device)
    fm = FluxModel(backbone, pattern=StreamingPattern(sink=int(cfg["sink"]), window=int(cfg["window"])),
                   router=router)
    targets = [float(t) for t in g["sa_targets"]]
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ctx = {"ring": int(cfg["sink"]) + int(cfg["window"]), "token_bytes": token_bytes, "bandwidth": bandwidth,
           "weights_read": weight_bytes_read_per_token(model), "weights_bytes": weights_bytes}
    # warm-up: compile every kernel on a short prompt (both FA and SA, mixed rows, graph capture)
    warm = torch.randint(0, model.config.vocab_size, (2, int(g.get("warmup_length", 4096))), device=device)
    alternate = torch.arange(layers, device=device) % 2 == 0
    fm.generate(warm, plan=torch.stack([alternate, ~alternate]), max_new_tokens=4, eos_token_id=[])
    fm.generate(warm, plan="dense", max_new_tokens=4, eos_token_id=[])
    thresholds: dict[tuple, dict[float, float]] = {}  # per job: its prompts
    new = int(g["new_tokens"])
    total_mem = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
                 else int(g.get("cpu_memory_gib", 8)) * GIB)
    rows: list[dict[str, Any]] = []
    jobs = [(job, plan) for job in g["jobs"] for plan in _plans(list(job["plans"]), targets)]
    for job, (name, target) in tqdm(jobs, desc="generate", file=sys.stdout):
        length, batch = int(job["length"]), job["batch"]
        is_max = batch == "max"
        row: dict[str, Any] = {"batch": batch, "length": length, "plan": name, "target": target}
        gen = torch.Generator(device=device).manual_seed(int(job.get("seed", 0)) + length)
        ids = torch.randint(0, model.config.vocab_size, (1 if is_max else int(batch), length), device=device,
                            generator=gen)
        try:
            if name in ("hf", "hf_static"):
                row.update(_hf_row(model, ids, new, static=name == "hf_static"))
            else:
                plan: Any = "dense"
                if name == "router":
                    key = (str(batch), length, int(job.get("seed", 0)))
                    if key not in thresholds:
                        thresholds[key] = calibrate(fm, router, targets, ids, int(g["calib_tokens"]))
                    plan = router.as_plan(threshold=thresholds[key][target])
                elif name in ("static", "replay"):
                    ref = _find(rows, batch, length, "router", target)
                    if ref is None:
                        row["error"] = f"needs the router@{target} row of this job first"
                        rows.append(row)
                        continue
                    plan = (ref["decisions"] if name == "replay"
                            else spread_sa_layers(layers, ref["sa_fraction"]))
                copies = 1
                if is_max:
                    one = _find(rows, 1, length, name, target)
                    per = one["kv_gib_per_sample"] * GIB if one else layers * (length + new) * token_bytes
                    spare = total_mem - weights_bytes - float(g["memory_margin_gib"]) * GIB
                    copies = max(1, min(int(g["max_batch_cap"]), int(spare // per)))
                    row["batch"] = copies
                    row["batch_kind"] = "max"
                repeats = int(g["repeats"]) if length <= int(g["repeat_up_to"]) else 1
                runs = [_engine_row(fm, plan, ids, new, copies, ctx) for _ in range(repeats)]
                best = min(runs, key=lambda r: r["ttft_ms"])
                best["decode_ms_per_token"] = statistics.median(r["decode_ms_per_token"] for r in runs)
                best["tokens_per_s"] = row["batch"] * 1e3 / best["decode_ms_per_token"] if is_max else \
                    int(batch) * 1e3 / best["decode_ms_per_token"]
                row.update(best)
        except torch.OutOfMemoryError:
            row["error"] = "oom"
        except (RuntimeError, ValueError) as err:  # a row that cannot run is recorded, the others still run
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
    _ratios(rows)
    for row in rows:
        row.pop("decisions", None)
    return rows


def _find(rows: list[dict[str, Any]], batch, length: int, plan: str, target: float | None):
    for r in rows:
        if (r["length"] == length and r["plan"] == plan and r.get("target") == target and "error" not in r
                and (r["batch"] == batch or (batch == "max" and r.get("batch_kind") == "max"))):
            return r
    return None


def _ratios(rows: list[dict[str, Any]]) -> None:
    """speedup_vs_dense / speedup_vs_hf: TTFT ratio on batch-1 rows, decode tokens/s ratio otherwise."""
    for row in rows:
        if "error" in row:
            continue
        kind = row.get("batch_kind", "fixed")
        for base_name, key in (("dense", "speedup_vs_dense"), ("hf", "speedup_vs_hf")):
            base = next((r for r in rows if r["plan"] == base_name and r["length"] == row["length"]
                         and r.get("batch_kind", "fixed") == kind and "error" not in r
                         and (kind == "max" or r["batch"] == row["batch"])), None)
            if base is None:
                continue
            if row["batch"] == 1 and kind == "fixed" and "ttft_ms" in base and "ttft_ms" in row:
                row[key] = base["ttft_ms"] / row["ttft_ms"]
            elif "tokens_per_s" in base and "tokens_per_s" in row:
                row[key] = row["tokens_per_s"] / base["tokens_per_s"]
        if row["plan"] == "replay":
            ref = _find(rows, row["batch"], row["length"], "router", row["target"])
            if ref is not None:
                row["router_cost_fraction"] = (ref["ttft_ms"] - row["ttft_ms"]) / ref["ttft_ms"]
        if row.get("peak_gib") and row.get("weights_plus_kv_gib"):
            row["peak_over_weights_kv"] = row["peak_gib"] / row["weights_plus_kv_gib"]
    for row in rows:
        for k, v in list(row.items()):
            if isinstance(v, float) and not math.isfinite(v):
                row[k] = None
