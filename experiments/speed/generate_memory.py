"""What `FluxModel.generate` holds at its memory peak, per plan (GPU): the live blocks at the peak, by flux source line.

The engine issue's target is peak <= weights + KV + 10% at 128k, batch 1. This runs one `generate` call per plan on
the bench's random-weight model (conf/bench.yaml's backbone, streaming sink/window) under the allocator's history
(experiments/memory_at_peak.py) and writes, per plan, the peak over weights + KV and what was alive at the peak.

    python experiments/speed/generate_memory.py --out DIR [--length 131072] [--plans dense,half,sparse] [bench overrides]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memory_at_peak import GIB, report, start  # noqa: E402

from flux.attention.patterns import StreamingPattern  # noqa: E402
from flux.backbone import Backbone, _ByteTokenizer  # noqa: E402
from flux.bench import build_model, load_plain_config  # noqa: E402
from flux.model import FluxModel  # noqa: E402


def plan_for(name: str, layers: int):
    if name == "half":
        return [i % 2 == 1 for i in range(layers)]
    return name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--length", type=int, default=131072)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--plans", default="dense,half,sparse")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    cfg = load_plain_config(a.overrides)
    device = torch.device("cuda")
    model = build_model(cfg, device)
    layers = model.config.num_hidden_layers
    fm = FluxModel(Backbone(model, _ByteTokenizer(model.config.vocab_size), "bench", "random weights"),
                   pattern=StreamingPattern(sink=int(cfg["sink"]), window=int(cfg["window"])))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    warm = torch.randint(0, model.config.vocab_size, (1, 4096), device=device)
    for name in a.plans.split(","):  # compile every kernel first, outside the recorded window
        fm.generate(warm, plan=plan_for(name, layers), max_new_tokens=4, eos_token_id=[])
    ids = torch.randint(0, model.config.vocab_size, (1, a.length), device=device)
    summary = []
    for name in a.plans.split(","):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = start()
        res = fm.generate(ids, plan=plan_for(name, layers), max_new_tokens=a.new, eos_token_id=[])
        text = report(base, f"generate plan={name} length={a.length} batch=1")
        ratio = torch.cuda.max_memory_allocated() / (weights + res.kv_bytes)
        line = (f"plan={name}: peak {torch.cuda.max_memory_allocated() / GIB:.3f} GiB, weights {weights / GIB:.3f}, "
                f"KV {res.kv_bytes / GIB:.3f}, peak / (weights + KV) = {ratio:.3f}")
        (a.out / f"memory_{name}.txt").write_text(line + "\n\n" + text)
        print(line + "\n" + text, flush=True)
        summary.append(line)
    (a.out / "memory_summary.txt").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
