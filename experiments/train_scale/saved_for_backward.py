"""What one `+experiment=qwen_32k` training step holds for its backward, measured on CPU (no allocator trace needed):
the real `flux.train` run (Hydra, Lightning, the distillation objective with its all-FA teacher, the streaming
pattern, the router) on the Qwen3-8B preset cut to CPU size, with flux.memory_probe's hooks around the step.

    python experiments/train_scale/saved_for_backward.py --length 2048 --checkpointing true
    python experiments/train_scale/saved_for_backward.py --length 2048 --checkpointing false --top 25

Prints, per token: the bytes saved for the backward outside checkpoints (saved_tensors_hooks), the bytes alive when
the backward starts and at the step's peak (a TorchDispatchMode following every storage the step creates), each
grouped by the source line that made them, and flux.memory's per-token accounting of the same shape.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir

import flux.train
from flux.memory import Shape
from flux.memory_probe import LiveTensors, SavedForBackward

REPO = Path(__file__).resolve().parents[2]

# Qwen3-8B's layout (GQA 4:1, head_dim a power of two, MLP 3x hidden, q/k norms) at a CPU size
CUT_QWEN3 = {"hidden_size": 512, "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 2,
             "head_dim": 64, "intermediate_size": 1536, "vocab_size": 4096, "max_position_embeddings": 16384}


class Probe(L.Callback):
    """Around the last training step: saved tensors during the forwards, live bytes from the step's start to its end."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.saved: SavedForBackward | None = None
        self.live: LiveTensors | None = None
        self.result: dict[str, Any] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        existing = [*pl_module.parameters(), *pl_module.buffers(),
                    *[v for v in batch.values() if isinstance(v, torch.Tensor)]]
        self.live = LiveTensors(existing)
        self.live.__enter__()
        self.saved = SavedForBackward(ignore=[*pl_module.parameters(), *pl_module.buffers()])
        self.saved.__enter__()

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self.saved is None:
            return
        self.saved.__exit__(None, None, None)
        self.result["saved"] = self.saved.total
        self.result["saved_by_source"] = self.saved.by_source()
        self.result["held"] = self.live.alive()
        self.result["held_by_source"] = self.live.snapshot()
        self.result["forward_peak"] = self.live.peak

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.live is None or "held" not in self.result:
            return
        self.live.__exit__(None, None, None)
        self.result["peak"] = self.live.peak
        self.result["peak_by_source"] = self.live.peak_sources
        self.result["tokens"] = int(batch["attention_mask"].sum())
        self.live = None


def run(length: int, checkpointing: bool, dtype: str, precision: str, layers: int) -> tuple[dict, Shape]:
    cut = {**CUT_QWEN3, "num_hidden_layers": layers}
    overrides = "{" + ", ".join(f"{k}: {v}" for k, v in cut.items()) + "}"
    out = Path(tempfile.mkdtemp(prefix="flux_saved_"))
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[
            "+experiment=qwen_32k", "backbone=qwen3_8b_random", f"backbone.overrides={overrides}",
            f"backbone.dtype={dtype}", "trainer=cpu", f"trainer.precision={precision}", "logger=csv",
            f"data.length_tokens=[{length}]", f"data.max_tokens={length + 256}", "data.tasks=[niah_multikey]",
            "data.n_train=1", "data.n_val=1", "data.batch_size=1", "trainer.max_steps=2",
            "trainer.limit_val_batches=0", "checkpoint_every=null", "routing_map_every=1000000",
            "router.init_fa_bias=0.0", "objective.per_task=null", "sparse.sink=16", f"sparse.window={length // 8}",
            f"gradient_checkpointing={str(checkpointing).lower()}", f"output_dir={out}"])
    probe = Probe(step=1)  # the second step: nothing lazily built by the first one counts
    real_build = flux.train.build_trainer

    def with_probe(*args, **kwargs):
        trainer = real_build(*args, **kwargs)
        trainer.callbacks.append(probe)
        return trainer

    flux.train.build_trainer = with_probe
    try:
        flux.train.run(cfg)
    finally:
        flux.train.build_trainer = real_build
    from flux.backbone import random_preset_config

    config = random_preset_config("qwen3_8b", cut)
    return probe.result, Shape.of(config, getattr(torch, dtype))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--checkpointing", choices=("true", "false"), default="true")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--precision", default="bf16-mixed", help="the GPU rows run bf16-mixed")
    parser.add_argument("--layers", type=int, default=CUT_QWEN3["num_hidden_layers"])
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--json", type=Path, help="write the numbers here too")
    args = parser.parse_args()
    ckpt = args.checkpointing == "true"
    result, shape = run(args.length, ckpt, args.dtype, args.precision, args.layers)
    n = result["tokens"]
    per_layer = shape.saved_per_token_layer()
    expected = shape.layers * (shape.dtype_bytes * shape.hidden if ckpt else per_layer)
    print(f"{n} tokens, {shape.layers} layers, hidden {shape.hidden}, checkpointing {ckpt}, {args.dtype}")
    print(f"flux.memory per token: saved by the layers {expected} B "
          f"({'inputs only' if ckpt else 'every layer'}), one layer's full saves {per_layer} B")
    for key in ("saved", "held", "forward_peak", "peak"):
        print(f"{key:>13}: {result[key] / n:10.0f} B/token  ({result[key] / n / shape.layers:8.0f} per layer)")
    for key in ("saved_by_source", "held_by_source", "peak_by_source"):
        print(f"\n{key} (bytes per token, storages, source):")
        for source, nbytes, count in result[key][:args.top]:
            print(f"  {nbytes / n:10.0f} {count:5d}  {source}")
    if args.json:
        args.json.write_text(json.dumps({"tokens": n, "layers": shape.layers, "checkpointing": ckpt,
                                         **{k: v for k, v in result.items() if k != "tokens"}}, indent=1))


if __name__ == "__main__":
    main()
