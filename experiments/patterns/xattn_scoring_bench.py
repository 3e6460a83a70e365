"""XAttention's antidiagonal scoring on one GPU: the two-pass kernel against the one-pass kernel in several tilings,
and what each makes of xattn's whole prefill at 10% block density against dense SDPA (one attention layer, batch 1,
Qwen2.5-7B heads: 28 query / 4 KV, head_dim 128, bf16; block 128, stride 8, the pattern's defaults).

    python experiments/patterns/xattn_scoring_bench.py --out xattn_scoring.json

First every variant is checked against the torch fallback (``xattn_block_scores_torch``) on a padded GQA prompt,
then timed (CUDA events, warmup, median) at each length. ``TFLOP/s`` counts the causal strided multiply-adds the
scores need, stride * head_dim per (strided row, strided column <= row) per head, twice. ``attn ms`` is xattn's
prefill with that variant's scoring: scoring, block selection at density 0.1, block lists and block-sparse
attention (the steps of ``XAttentionPattern.triton_prefill``); the ``pattern`` row times
``get_pattern("xattn", density=0.1).prefill`` itself (default tiling) as a check on the composed rows.
``--attn-tiles MxNwWsS ...`` also times the block-sparse attention's tilings (M query rows per program, N keys per
step, W warps, S pipeline stages; e.g. 128x64w8s3, the default): rows ``attention MxNwWsS``, each checked against
the float64 reference first, with the default scoring (its time in the row) and that attention tiling.
``--smoke`` runs the same code on a CPU at a tiny shape through Triton's interpreter (tests).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from flux_kernels.interpret import use_interpreter_without_cuda

use_interpreter_without_cuda()

from flux_kernels.block_select import block_lists, select_blocks  # noqa: E402
from flux_kernels.block_sparse_prefill import block_sparse_attention  # noqa: E402
from flux_kernels.reference import block_sparse_attention_reference  # noqa: E402
from flux_kernels.xattn_scores import xattn_block_scores, xattn_block_scores_torch  # noqa: E402

from flux.attention.patterns import get_pattern  # noqa: E402
from flux.bench import cuda_time, sdpa_causal  # noqa: E402

DENSITY = 0.1
BASELINE = ("two-pass", "r64c64d128w4s3")  # the kernel and tiling of the measured 76 ms at 128k
# r64c64d128w4s3 in one pass isolates the gain of the single walk; ":2048" raises the scratch bound to 2 GiB (fewer,
# fuller launches: at 256k one head's scratch is 0.3 GiB, so the default 512 MiB scores one head per launch)
DEFAULT_TILES = ["r64c64d128w4s3", "r128c64d64w4s3", "r128c128d64w8s3", "r128c256d64w8s3", "r128c128d64w8s3:2048"]
GPU_SHAPE = {"heads": 28, "kv_heads": 4, "head_dim": 128, "dtype": torch.bfloat16, "block": 128, "stride": 8,
             "lengths": [32768, 131072, 262144], "check_length": 4096, "warmup": 1, "repeats": 3}
SMOKE_SHAPE = {"heads": 4, "kv_heads": 2, "head_dim": 16, "dtype": torch.float32, "block": 32, "stride": 4,
               "lengths": [200], "check_length": 150, "warmup": 0, "repeats": 1}


def time_ms(fn: Callable[[], Any], warmup: int, repeats: int) -> float:
    """Median milliseconds per call: flux.bench's CUDA-event timer on a GPU, the wall clock on the CPU (smoke runs)."""
    if torch.cuda.is_available():
        return cuda_time(fn, warmup, repeats)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def scoring_flops(heads: int, length: int, head_dim: int, stride: int) -> float:
    """Floating-point operations of the causal strided logits: 2 * stride * head_dim per (row, column <= row)."""
    n = math.ceil(length / stride)
    return 2.0 * heads * stride * head_dim * n * (n + 1) / 2


def variants(tiles: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """(label, xattn_block_scores keyword arguments): the two-pass baseline, then the one-pass tilings, each given
    as a SCORE_TILES name or NAME:MIB (that tiling with a scratch bound of MIB MiB)."""
    passes, name = BASELINE
    out = [(f"{passes} {name}", {"passes": 2, "tiles": name})]
    for spec in tiles:
        tiling, _, mib = spec.partition(":")
        kwargs = {"passes": 1, "tiles": tiling}
        if mib:
            kwargs["max_scratch_bytes"] = int(mib) << 20
        out.append((f"one-pass {tiling}" + (f" scratch {mib} MiB" if mib else ""), kwargs))
    return out


def attn_tiling(spec: str) -> dict[str, int]:
    """'128x64w8s3' -> block_sparse_attention's tiling keywords."""
    try:
        rows_cols, rest = spec.split("w")
        bm, bn = (int(x) for x in rows_cols.split("x"))
        warps, stages = (int(x) for x in rest.split("s"))
    except ValueError:
        raise SystemExit(f"--attn-tiles {spec!r}: write MxNwWsS, e.g. 128x64w8s3") from None
    return {"block_m": bm, "block_n": bn, "num_warps": warps, "num_stages": stages}


def padded_check_prompt(shape: dict[str, Any], device: torch.device, seed: int):
    """(q, k, v, pad, valid) of the correctness checks: two GQA samples of check_length tokens, the second left-padded
    off a block boundary."""
    length = shape["check_length"]
    gen = torch.Generator(device=device).manual_seed(seed)
    h, hk, d, dt = shape["heads"], shape["kv_heads"], shape["head_dim"], shape["dtype"]
    q = torch.randn(2, h, length, d, device=device, dtype=dt, generator=gen)
    k = torch.randn(2, hk, length, d, device=device, dtype=dt, generator=gen)
    v = torch.randn(2, hk, length, d, device=device, dtype=dt, generator=gen)
    pad = torch.tensor([0, length // 3 + 5], device=device)
    valid = torch.arange(length, device=device)[None, :] >= pad[:, None]
    return q, k, v, pad, valid


def check_attn_tilings(shape: dict[str, Any], specs: list[str], device: torch.device, block: int,
                       stride: int) -> dict[str, str]:
    """Each attention tiling against the float64 reference on two left-padded GQA samples at 10% density; returns
    {label: error} for tilings that do not compile. A wrong result raises."""
    length, dt = shape["check_length"], shape["dtype"]
    q, k, v, pad, valid = padded_check_prompt(shape, device, seed=11)
    scale = shape["head_dim"] ** -0.5
    keep = select_blocks(xattn_block_scores(q, k, block, stride, pad, scale), valid, block, length, density=DENSITY)
    blocks, counts = block_lists(keep)
    want = block_sparse_attention_reference(q.double(), k.double(), v.double(), keep, block, pad, scale)
    failed = {}
    for spec in specs:
        label = f"attention {spec}"
        try:
            got = block_sparse_attention(q, k, v, blocks, counts, block, pad, scale, **attn_tiling(spec))
        except Exception as err:  # noqa: BLE001 -- a tiling that cannot compile is reported, not fatal
            failed[label] = f"error: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
            continue
        err = (got.double() - want).abs().max().item()
        tol = 1e-4 if dt == torch.float32 else 3e-2
        assert err < tol, f"{label}: max abs error {err:.3g} against the float64 reference exceeds {tol}"
        print(f"check {label}: max abs error {err:.2e} at {length} tokens (padded, GQA)", flush=True)
    return failed


def random_prompt(shape: dict[str, Any], length: int, device: torch.device, seed: int):
    gen = torch.Generator(device=device).manual_seed(seed)
    h, hk, d, dt = shape["heads"], shape["kv_heads"], shape["head_dim"], shape["dtype"]
    # q as HF hands it to the attention function: a [B, T, H, D] tensor viewed as [B, H, T, D]
    q = torch.randn(1, length, h, d, device=device, dtype=dt, generator=gen).transpose(1, 2)
    k = torch.randn(1, hk, length, d, device=device, dtype=dt, generator=gen)
    v = torch.randn(1, hk, length, d, device=device, dtype=dt, generator=gen)
    return q, k, v


def check_variants(shape: dict[str, Any], labelled: list[tuple[str, dict[str, Any]]], device: torch.device,
                   block: int, stride: int) -> dict[str, str]:
    """Each variant against the torch fallback on two left-padded GQA samples; returns {label: error} for the
    variants that do not compile (e.g. a tiling over the shared-memory limit). A wrong result raises."""
    length, dt = shape["check_length"], shape["dtype"]
    q, k, _, pad, valid = padded_check_prompt(shape, device, seed=7)
    scale = shape["head_dim"] ** -0.5
    want = xattn_block_scores_torch(q, k, valid, block, stride, scale)
    failed = {}
    for label, kwargs in labelled:
        try:
            got = xattn_block_scores(q, k, block, stride, pad, scale, **kwargs)
        except Exception as err:  # noqa: BLE001 -- a tiling that cannot compile is reported, not fatal
            failed[label] = f"error: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
            continue
        err = ((got - want).abs().max() / want.abs().max()).item()
        tol = 1e-5 if dt == torch.float32 else 2e-2
        assert err < tol, f"{label}: relative error {err:.3g} against xattn_block_scores_torch exceeds {tol}"
        print(f"check {label}: max relative error {err:.2e} at {length} tokens (padded, GQA)", flush=True)
    return failed


def length_rows(shape: dict[str, Any], labelled: list[tuple[str, dict[str, Any]]], failed: dict[str, str],
                length: int, device: torch.device, block: int, stride: int,
                max_scratch_bytes: int | None, attn_specs: list[str] = ()) -> list[dict[str, Any]]:
    q, k, v = random_prompt(shape, length, device, seed=length)
    d, warm, reps = shape["head_dim"], shape["warmup"], shape["repeats"]
    scale = d ** -0.5
    dense_ms = time_ms(lambda: sdpa_causal(q, k, v, scale, "auto"), warm, reps)
    flops = scoring_flops(shape["heads"], length, d, stride)
    extra = {} if max_scratch_bytes is None else {"max_scratch_bytes": max_scratch_bytes}
    rows = []
    for label, kwargs in labelled:
        row = {"length": length, "variant": label, "dense_ms": dense_ms}
        if label in failed:
            rows.append({**row, "error": failed[label]})
            continue
        kw = {**(extra if kwargs["passes"] == 1 else {}), **kwargs}

        def score(kw=kw):
            return xattn_block_scores(q, k, block, stride, None, scale, **kw)

        def attend(score=score):
            keep = select_blocks(score(), None, block, length, density=DENSITY)
            blocks, counts = block_lists(keep)
            return block_sparse_attention(q, k, v, blocks, counts, block, None, scale)

        row["scoring_ms"] = time_ms(score, warm, reps)
        row["scoring_tflops"] = flops / (row["scoring_ms"] * 1e9)
        row["attn_ms"] = time_ms(attend, warm, reps)
        rows.append(row)
        print(f"{length} {label}: scoring {row['scoring_ms']:.2f} ms ({row['scoring_tflops']:.3g} TFLOP/s), "
              f"attention {row['attn_ms']:.2f} ms, dense {dense_ms:.2f} ms", flush=True)
    if attn_specs:
        def default_score():
            return xattn_block_scores(q, k, block, stride, None, scale)

        scoring_ms = time_ms(default_score, warm, reps)
        for spec in attn_specs:
            label = f"attention {spec}"
            row = {"length": length, "variant": label, "dense_ms": dense_ms}
            if label in failed:
                rows.append({**row, "error": failed[label]})
                continue

            def attend_tiled(tiling=attn_tiling(spec)):
                keep = select_blocks(default_score(), None, block, length, density=DENSITY)
                blocks, counts = block_lists(keep)
                return block_sparse_attention(q, k, v, blocks, counts, block, None, scale, **tiling)

            row.update(scoring_ms=scoring_ms, scoring_tflops=flops / (scoring_ms * 1e9),
                       attn_ms=time_ms(attend_tiled, warm, reps))
            rows.append(row)
            print(f"{length} {label}: attention {row['attn_ms']:.2f} ms (scoring {scoring_ms:.2f} ms), dense "
                  f"{dense_ms:.2f} ms", flush=True)
    pattern = get_pattern("xattn", density=DENSITY, block_size=block, stride=stride)
    rows.append({"length": length, "variant": "pattern (default tiles)", "dense_ms": dense_ms,
                 "attn_ms": time_ms(lambda: pattern.prefill(q, k, v, None, scale, "triton"), warm, reps)})
    for row in rows:
        if "attn_ms" in row:
            row["speedup"] = dense_ms / row["attn_ms"]
    del q, k, v
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    def fmt(row: dict[str, Any], key: str, spec: str) -> str:
        return format(row[key], spec) if isinstance(row.get(key), float) else row.get("error", "-")[:40]

    lines = ["| length | variant | scoring ms | scoring TFLOP/s | xattn attn ms @10% | dense ms | speedup |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['length']} | {r['variant']} | {fmt(r, 'scoring_ms', '.2f')} | "
                     f"{fmt(r, 'scoring_tflops', '.3g')} | {fmt(r, 'attn_ms', '.2f')} | {r['dense_ms']:.2f} | "
                     f"{fmt(r, 'speedup', '.2f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", nargs="+", default=DEFAULT_TILES,
                        help="one-pass tilings to time: names in flux_kernels.xattn_scores.SCORE_TILES, or NAME:MIB for that "
                             "tiling under a MIB MiB scratch bound")
    parser.add_argument("--lengths", type=int, nargs="+", help="override the prompt lengths")
    parser.add_argument("--max-scratch-mib", type=int,
                        help="scratch bound of the one-pass tilings given without :MIB (default: the kernel's)")
    parser.add_argument("--block", type=int, help="block size (default 128, the pattern's)")
    parser.add_argument("--stride", type=int, help="antidiagonal stride (default 8, the pattern's)")
    parser.add_argument("--attn-tiles", nargs="+", default=[],
                        help="block-sparse attention tilings to time with the default scoring, as MxNwWsS (query rows "
                             "per program x keys per step, warps, stages), e.g. 128x64w8s3 128x128w8s3")
    parser.add_argument("--out", help="also write the rows as JSON here")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter (tests)")
    args = parser.parse_args(argv)
    if args.smoke:
        shape, device = SMOKE_SHAPE, torch.device("cpu")
    elif torch.cuda.is_available():
        shape, device = GPU_SHAPE, torch.device("cuda")
    else:
        parser.error("needs a CUDA device; use --smoke for a CPU run of tiny shapes")
    shape = {**shape, "lengths": args.lengths or shape["lengths"], "block": args.block or shape["block"],
             "stride": args.stride or shape["stride"]}
    block, stride = shape["block"], shape["stride"]
    scratch = None if args.max_scratch_mib is None else args.max_scratch_mib << 20
    labelled = variants(args.tiles)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu (Triton interpreter)'}; "
          f"heads {shape['heads']}/{shape['kv_heads']}, head_dim {shape['head_dim']}, {shape['dtype']}, "
          f"block {block}, stride {stride}", flush=True)
    failed = check_variants(shape, labelled, device, block, stride)
    failed.update(check_attn_tilings(shape, args.attn_tiles, device, block, stride))
    rows = []
    for length in shape["lengths"]:
        rows += length_rows(shape, labelled, failed, length, device, block, stride, scratch, args.attn_tiles)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": str(device), "shape": {**shape, "dtype": str(shape["dtype"])}, "rows": rows}, f,
                      indent=1)
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
