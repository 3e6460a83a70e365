"""Measure paper-scale router training on one GPU: each row is one real `python -m flux.train` run.

Rows: `+experiment=qwen_32k` on the random-weight Qwen3-8B preset at 32k and 64k tokens (64k with Qwen's YaRN rope
setting, as Qwen3-8B has 40,960 positions natively) and `+experiment=llama_128k` on the random-weight Llama-3.1-8B
preset at 128k (130,000-token prompts: Llama's 131,072 positions hold the prompt plus its answer), each with and
without activation checkpointing, on one GPU (`trainer=gpu`: bf16-mixed, one device), CSV logger, no validation and
no checkpoints. Every row trains on one synthetic sample repeated, so every step has the same length: the first step
compiles FlexAttention and the engine's Triton kernels, and the steps after it are timed. The router starts with no
bias towards FA (`router.init_fa_bias=0`), so about half the layers take each branch, as in the middle of training,
and every kernel (FA and SA, with and without gradients) runs in the first step. `objective.per_task` is set to null for
qwen_32k: its per-task targets name tasks the one-task data does not have (they change targets, not the compute).

Each row reads the per-step `perf/*` metrics flux.train logs (flux/throughput.py); a run that fails (the memory
check's refusal before the first step, an out-of-memory error, a time-out) is a row with ok=false and its error
line. The estimate of flux.memory is written next to each measured peak.

    python experiments/train_scale/measure.py --out DIR            # GPU: the six rows, within --budget-s seconds
    python experiments/train_scale/measure.py --dry-run --out DIR  # CPU: the same path on a tiny preset, seconds

Writes DIR/train_scale.json ({"gpu", "rows": [{"length", "batch", "checkpointing", "step_s", "tokens_per_s",
"peak_gib", "ok", ...}]}) and DIR/train_scale.md (the table); the runs themselves go to --runs (outside DIR, so only
the two files come back from the GPU machine).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
YARN_128K = ("{rope_scaling: {rope_type: yarn, factor: 4.0, original_max_position_embeddings: 32768}, "
             "max_position_embeddings: 131072}")
TINY_QWEN3 = ("{hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, head_dim: 16, "
              "intermediate_size: 128, max_position_embeddings: 1024}")
GIB = 2 ** 30


@dataclass(frozen=True)
class Row:
    """One configuration: a recipe, a backbone preset, a prompt length, checkpointing, and how many steps to time."""

    label: str
    experiment: str
    backbone: str
    length: int
    max_tokens: int
    checkpointing: bool
    steps: int
    timed: int
    overrides: str | None = None
    extra: tuple[str, ...] = field(default=())

    @property
    def name(self) -> str:
        return f"{self.label}_{'ckpt' if self.checkpointing else 'nockpt'}"

    def command(self, python: str, run_dir: Path, dry_run: bool) -> list[str]:
        args = [f"+experiment={self.experiment}", f"backbone={self.backbone}", "logger=csv",
                f"data.length_tokens=[{self.length}]", f"data.max_tokens={self.max_tokens}",
                "data.tasks=[niah_multikey]", "data.n_train=1", "data.n_val=1", "data.batch_size=1",
                f"trainer.max_steps={self.steps}", "trainer.limit_val_batches=0", "trainer.log_every_n_steps=1",
                "checkpoint_every=null", "routing_map_every=1000000", "router.init_fa_bias=0.0",
                f"gradient_checkpointing={str(self.checkpointing).lower()}",
                f"output_dir={run_dir}", f"hydra.run.dir={run_dir}"]
        args.append("trainer=cpu" if dry_run else "trainer=gpu")
        if self.experiment == "qwen_32k":
            args.append("objective.per_task=null")
        if self.overrides:
            args.append(f"backbone.overrides={self.overrides}")
        return [python, "-m", "flux.train", *args, *self.extra]


# Order: the measured rows that matter most first, the refusals (seconds each) before the row the budget may cut.
# Steps from a FLOP estimate (distillation teacher + routed forward + recomputation + backward, about 110 GFLOP per
# token at 32k, 160 at 64k, 250 at 128k, at 350-450 TFLOP/s): 32k ~8 s, 64k ~25 s, 128k ~75 s per step, plus a
# first step of ~1 minute of compilation; about 8 minutes in all.
GPU_ROWS = (
    Row("32k", "qwen_32k", "qwen3_8b_random", 32768, 34000, True, steps=3, timed=2),
    Row("32k", "qwen_32k", "qwen3_8b_random", 32768, 34000, False, steps=3, timed=2),
    Row("128k", "llama_128k", "llama3_1_8b_random", 130000, 131072, False, steps=2, timed=1),
    Row("64k", "qwen_32k", "qwen3_8b_random", 65536, 67000, False, steps=2, timed=1, overrides=YARN_128K),
    Row("128k", "llama_128k", "llama3_1_8b_random", 130000, 131072, True, steps=2, timed=1),
    Row("64k", "qwen_32k", "qwen3_8b_random", 65536, 67000, True, steps=2, timed=1, overrides=YARN_128K),
)
# The same path on CPU: the Qwen3-8B preset cut down (its 151,936-token vocabulary kept), a row of ~600 tokens, and
# one longer than the cut-down model's 1,024 positions (a failing run must become an ok=false row).
DRY_ROWS = tuple(
    Row(label, "qwen_32k", "qwen3_8b_random", length, 2048, ckpt, steps=2, timed=1, overrides=TINY_QWEN3,
        extra=("sparse.sink=16", "sparse.window=128"))
    for label, length, ckpt in (("600", 600, True), ("1500", 1500, False)))


def gpu_name() -> str:
    """The GPU as nvidia-smi names it (without touching CUDA in this process), or a note that there is none."""
    if shutil.which("nvidia-smi") is None:
        return "none (CPU dry run)"
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, check=False).stdout.strip().splitlines()
    return out[0] if out else "unknown"


def estimate_gib(row: Row) -> float:
    """flux.memory's estimate of the row's peak (weights included), from the preset's shape alone."""
    import torch

    from flux.backbone import RANDOM_PRESETS, random_preset_config
    from flux.memory import Shape, estimate_training_memory

    source = {"qwen3_8b_random": "qwen3_8b", "llama3_1_8b_random": "llama3_1_8b", "qwen2_5_7b_random": "qwen2_5_7b"}
    name = source[row.backbone]
    assert name in RANDOM_PRESETS
    overrides = None
    if row.overrides:
        from omegaconf import OmegaConf

        overrides = OmegaConf.to_container(OmegaConf.create(f"x: {row.overrides}"))["x"]
    config = random_preset_config(name, overrides)
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        weights = sum(p.numel() * 2 for p in AutoModelForCausalLM.from_config(config).parameters())
    shape = Shape.of(config, torch.bfloat16)
    answer_rows = 64  # a niah_multikey answer and the few tokens after it
    need = estimate_training_memory(shape, row.length, 1, row.checkpointing, answer_rows, True, weights)
    return round(need.total / GIB, 1)


def read_steps(run_dir: Path) -> list[dict[str, float]]:
    """The per-step perf/* metrics of a run's CSV log, in step order."""
    path = run_dir / "csv" / "version_0" / "metrics.csv"
    if not path.is_file():
        return []
    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("perf/step_s")]
    return sorted(({k: float(v) for k, v in r.items() if k in ("step",) or k.startswith("perf/") and v}
                   for r in rows), key=lambda r: r["step"])


def error_line(stderr: str) -> str:
    """flux's one-line error, else the last line of a traceback (e.g. torch.OutOfMemoryError: ...)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line[:500]
    return (lines[-1] if lines else "no output")[:500]


def measure(row: Row, python: str, runs: Path, dry_run: bool, timeout: float) -> dict:
    run_dir = runs / row.name
    shutil.rmtree(run_dir, ignore_errors=True)
    command = row.command(python, run_dir, dry_run)
    record = {"name": row.name, "experiment": row.experiment, "backbone": row.backbone, "length": row.length,
              "batch": 1, "checkpointing": row.checkpointing, "step_s": None, "tokens_per_s": None,
              "peak_gib": None, "ok": False, "estimate_gib": estimate_gib(row),
              "steps": row.steps, "timed_steps": row.timed, "command": " ".join(command[1:])}
    start = time.monotonic()
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)
        returncode, stderr = done.returncode, done.stderr
    except subprocess.TimeoutExpired as stopped:
        returncode = None
        stderr = (stopped.stderr or b"").decode(errors="replace") if isinstance(stopped.stderr, bytes) \
            else (stopped.stderr or "")
    record["wall_s"] = round(time.monotonic() - start, 1)
    (runs / f"{row.name}.log").write_text(stderr)
    steps = read_steps(run_dir)
    timed = steps[-row.timed:] if len(steps) >= row.steps else []
    if timed:
        seconds = sum(s["perf/step_s"] for s in timed)
        record["step_s"] = round(seconds / len(timed), 3)
        record["tokens_per_s"] = round(sum(s["perf/tokens"] for s in timed) / seconds, 1)
        record["tokens"] = int(timed[-1]["perf/tokens"])
        peaks = [s["perf/peak_gib"] for s in steps if "perf/peak_gib" in s]
        record["peak_gib"] = round(max(peaks), 1) if peaks else None
        for key in ("forward_peak_gib", "held_for_backward_gib"):  # where the step's memory goes (flux/throughput.py)
            values = [s[f"perf/{key}"] for s in timed if f"perf/{key}" in s]
            record[key] = round(max(values), 1) if values else None
        record["first_step_s"] = round(steps[0]["perf/step_s"], 1)
    if returncode == 0 and timed:
        record["ok"] = True
    elif returncode is None:
        record["error"] = (f"stopped after {record['wall_s']} s, at the script's time budget; run this row alone "
                           f"(--rows {row.name}) to measure it")
    else:
        record["error"] = error_line(stderr) if returncode else f"only {len(steps)} of {row.steps} steps logged"
    return record


def table(result: dict) -> str:
    lines = [f"GPU: {result['gpu']}", "",
             "| length | recipe | checkpointing | ok | step (s) | tokens/s | peak GiB | estimate GiB | note |",
             "|---:|---|:-:|:-:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        cells = [str(r.get("tokens") or r["length"]), f"{r['experiment']} / {r['backbone']}",
                 "on" if r["checkpointing"] else "off", "yes" if r["ok"] else "**no**",
                 *(f"{r[k]:g}" if r[k] is not None else "-" for k in ("step_s", "tokens_per_s", "peak_gib",
                                                                       "estimate_gib")),
                 r.get("error", "").replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny preset, short prompts (the test suite)")
    parser.add_argument("--out", default=os.environ.get("OUT", "outputs/train_scale"), help="where the two files go")
    parser.add_argument("--runs", default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--rows", default=None, help="comma-separated row names (e.g. 32k_ckpt,128k_ckpt)")
    parser.add_argument("--budget-s", type=float, default=470.0, help="wall seconds for all rows together")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    rows = DRY_ROWS if args.dry_run else GPU_ROWS
    if args.rows:
        wanted = args.rows.split(",")
        unknown = sorted(set(wanted) - {r.name for r in rows})
        if unknown:
            parser.error(f"unknown rows {unknown}; rows are {', '.join(r.name for r in rows)}")
        rows = tuple(r for r in rows if r.name in wanted)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = Path(args.runs) if args.runs else Path(os.environ.get("TMPDIR", "/tmp")) / "flux_train_scale_runs"
    runs.mkdir(parents=True, exist_ok=True)
    result = {"gpu": gpu_name(), "dry_run": args.dry_run, "rows": []}
    deadline = time.monotonic() + args.budget_s
    for row in rows:
        left = deadline - time.monotonic()
        if left < 5:
            result["rows"].append({"name": row.name, "experiment": row.experiment, "backbone": row.backbone,
                                   "length": row.length, "batch": 1, "checkpointing": row.checkpointing,
                                   "step_s": None, "tokens_per_s": None, "peak_gib": None, "ok": False,
                                   "estimate_gib": None,
                                   "error": f"not run: the time budget (--budget-s {args.budget_s:g}) was spent"})
            continue
        record = measure(row, args.python, runs, args.dry_run, left)
        result["rows"].append(record)
        print(json.dumps(record), flush=True)
        (out / "train_scale.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "train_scale.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "train_scale.md").write_text(table(result))
    print(table(result))


if __name__ == "__main__":
    main()
