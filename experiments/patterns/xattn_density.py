"""The block density XAttention's default threshold keeps on real SmolLM2 activations (read beside the bench's
fixed-density rows, which random weights need): RULER-style prompts over a text haystack, 4k and 8k tokens.

    python experiments/patterns/xattn_density.py --backbone smollm2_135m --device cuda --out density.json
"""

from __future__ import annotations

import argparse
import json

import torch

from flux.attention.patterns import XAttentionPattern
from flux.backbone import load_backbone
from flux.bench_patterns import xattn_real_density
from flux.data.prompting import build_prompt
from flux.evals.ruler import RulerTask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="smollm2_135m", help="preset, .gguf file or model folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--n", type=int, default=2, help="prompts per task and length")
    parser.add_argument("--out", default="xattn_density.json")
    args = parser.parse_args()
    backbone = load_backbone(args.backbone, device=args.device)
    tok = backbone.tokenizer
    tasks = ["niah_single", "niah_multikey", "variable_tracking", "fwe"]
    task = RulerTask(tasks=tasks, lengths=args.lengths, n=args.n, seed=5, haystack="text")
    prompts = []
    for sample in task.samples(tok):
        fields = sample.prompt_fields()
        built = build_prompt(tok, fields.context, fields.question, separator=fields.separator, chat=sample.chat,
                             max_tokens=backbone.max_positions - 64, task=sample.task, example_id=sample.id)
        prompts.append(torch.tensor(list(built.input_ids)))
    pattern = XAttentionPattern()
    result = xattn_real_density(backbone.model, prompts, pattern)
    result["backbone"] = backbone.name
    result["prompts"] = {"tasks": tasks, "lengths": args.lengths, "n": args.n, "haystack": "text", "seed": 5}
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"xattn {pattern.describe()} on {backbone.name}: block density {result['density']:.3f} over "
          f"{len(prompts)} prompts ({', '.join(str(t) for t in sorted(set(result['tokens'])))} tokens)")


if __name__ == "__main__":
    main()
