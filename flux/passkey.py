"""`python -m flux.passkey`: route half of SmolLM2's layers to sparse attention on a built-in long prompt.

Loads the offline backbone, answers a passkey question buried in filler text with every layer on full attention and
with every other layer on sink + window attention, and prints the routing plan, the answers, and the KV memory the
routed cache holds compared with a full cache.
"""

from __future__ import annotations

import time

import torch

from flux.attention.patterns import StreamingPattern
from flux.backbone import load_backbone
from flux.errors import ArgumentParser, ConfigError, run_cli
from flux.model import FluxModel
from flux.preflight import warn_if_window_covers

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


def passkey_prompt(tokenizer, passkey: str = "68213", filler_tokens: int = 3000, depth: float = 0.25) -> list[int]:
    """Chat-formatted token ids: a passkey line at `depth` of ~`filler_tokens` tokens of filler, then the question."""
    per_repeat = len(tokenizer.encode(FILLER, add_special_tokens=False))
    if isinstance(filler_tokens, bool) or not isinstance(filler_tokens, int) or filler_tokens < per_repeat:
        raise ConfigError(f"filler_tokens={filler_tokens!r} is less than one filler passage ({per_repeat} tokens); "
                          f"use at least {per_repeat} (e.g. --filler-tokens 3000)")
    if not 0.0 <= depth <= 1.0:
        raise ConfigError(f"depth={depth!r} must lie in [0, 1] (0 = the passkey at the start of the filler)")
    repeats = filler_tokens // per_repeat
    before = int(repeats * depth)
    needle = f"The pass key is {passkey}. Remember it. {passkey} is the pass key. "
    context = FILLER * before + needle + FILLER * (repeats - before)
    question = "What is the pass key? Answer with the number only."
    messages = [{"role": "user", "content": f"{context}\n\n{question}"}]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer.encode(f"{context}\n\n{question}\nAnswer:", add_special_tokens=False)


def format_plan(sa: list[bool]) -> str:
    return "".join("S" if s else "F" for s in sa)


def build_pattern(sink: int | None, window: int | None) -> StreamingPattern:
    """The streaming pattern with StreamingPattern's own defaults for whatever is not given (the one documented
    default); checked before the backbone loads."""
    given = {k: v for k, v in (("sink", sink), ("window", window)) if v is not None}
    return StreamingPattern(**given)


def run(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m flux.passkey", description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="smollm2_135m")
    parser.add_argument("--filler-tokens", type=int, default=3000)
    parser.add_argument("--sink", type=int, default=None, help="attention sinks (default: StreamingPattern's)")
    parser.add_argument("--window", type=int, default=None, help="local window (default: StreamingPattern's)")
    args = parser.parse_args(argv)
    pattern = build_pattern(args.sink, args.window)
    if args.filler_tokens < 1:
        raise ConfigError(f"--filler-tokens={args.filler_tokens} must be a positive number of tokens; e.g. 3000")

    t0 = time.time()
    backbone = load_backbone(args.backbone)
    ids = torch.tensor([passkey_prompt(backbone.tokenizer, filler_tokens=args.filler_tokens)])
    fm = FluxModel(backbone, pattern=pattern)
    warn_if_window_covers(pattern, ids.shape[1], "passkey")
    print(f"backbone {backbone.name}: {backbone.num_layers} layers, loaded in {time.time() - t0:.1f}s; "
          f"prompt {ids.shape[1]} tokens; sparse pattern sink={pattern.sink} window={pattern.window}")
    half = [i % 2 == 1 for i in range(backbone.num_layers)]
    for label, plan in (("all full attention", "dense"), ("half the layers sparse", half)):
        t = time.time()
        res = fm.generate(ids, plan=plan, max_new_tokens=12)
        answer = backbone.tokenizer.decode(res.sequences[0], skip_special_tokens=True).strip()
        sa = res.decisions[0].tolist()
        print(f"\n[{label}] plan {format_plan(sa)}  (F = full, S = sparse; {sum(sa)}/{len(sa)} layers sparse)")
        print(f"  answer: {answer!r}  ({time.time() - t:.1f}s)")
        print(f"  KV cache held: {res.kv_bytes / 2**20:.2f} MiB of {res.kv_bytes_dense / 2**20:.2f} MiB "
              f"for a full cache -> {100 * res.kv_saved_fraction:.1f}% saved")


def main() -> None:
    run_cli(run)


if __name__ == "__main__":
    main()
