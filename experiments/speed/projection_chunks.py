"""Does the q/k/v projection's step size cost prefill time? (GPU) Dense `FluxModel.generate` TTFT and peak memory at
one length, batch 1, for several `flux.engine.prefill.PROJECT_CHUNK_BYTES`, on the bench's random-weight model.

The step bounds the projection's temporaries, which sit at the prefill's memory peak; a smaller step must not make
the GEMMs slower. Each setting runs `--repeats` times (best TTFT), in alternating order so drift hits all alike.

    python experiments/speed/projection_chunks.py [--length 131072] [--mib 128,64,32] [bench overrides]
"""

from __future__ import annotations

import argparse
import time

import torch

from flux.attention.patterns import StreamingPattern
from flux.backbone import Backbone, _ByteTokenizer
from flux.bench import build_model, load_plain_config
from flux.engine import prefill as engine_prefill
from flux.model import FluxModel

GIB = 2 ** 30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=131072)
    ap.add_argument("--mib", default="128,64,32", help="PROJECT_CHUNK_BYTES settings, in MiB")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    cfg = load_plain_config(a.overrides)
    device = torch.device("cuda")
    model = build_model(cfg, device)
    fm = FluxModel(Backbone(model, _ByteTokenizer(model.config.vocab_size), "bench", "random weights"),
                   pattern=StreamingPattern(sink=int(cfg["sink"]), window=int(cfg["window"])))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    fm.generate(torch.randint(0, model.config.vocab_size, (1, 4096), device=device), plan="dense",
                max_new_tokens=2, eos_token_id=[])
    ids = torch.randint(0, model.config.vocab_size, (1, a.length), device=device)
    settings = [int(m) for m in a.mib.split(",")]
    best: dict[int, float] = {}
    peaks: dict[int, float] = {}
    kv = 0
    for _ in range(a.repeats):
        for mib in settings:
            engine_prefill.PROJECT_CHUNK_BYTES = mib * 2 ** 20
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = fm.generate(ids, plan="dense", max_new_tokens=1, eos_token_id=[])
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) * 1e3
            kv = res.kv_bytes
            best[mib] = min(best.get(mib, float("inf")), ms)
            peaks[mib] = torch.cuda.max_memory_allocated() / GIB
            print(f"PROJECT_CHUNK_BYTES={mib} MiB: TTFT {ms:.1f} ms, peak {peaks[mib]:.3f} GiB", flush=True)
    print(f"\nlength {a.length}, batch 1, dense; weights {weights / GIB:.3f} GiB, KV {kv / GIB:.3f} GiB\n")
    print("| projection step MiB | best TTFT ms | vs first | peak GiB | peak / (weights + KV) |")
    print("|---:|---:|---:|---:|---:|")
    for mib in settings:
        print(f"| {mib} | {best[mib]:.1f} | {best[mib] / best[settings[0]]:.3f} | {peaks[mib]:.3f} | "
              f"{peaks[mib] * GIB / (weights + kv):.3f} |")


if __name__ == "__main__":
    main()
