#!/usr/bin/env bash
# Paper-scale router training on one GPU: +experiment=qwen_32k at 32k and 64k tokens and +experiment=llama_128k at
# 128k, with and without activation checkpointing, on the random-weight presets of Qwen3-8B and Llama-3.1-8B (no
# download). Each row is one real `python -m flux.train` run; writes $OUT/train_scale.json and $OUT/train_scale.md
# (see measure.py for the rows and what is timed). Runs from any folder; flux comes from this checkout.
#
#   bash experiments/train_scale/device_run.sh             # GPU machine: the six rows in under 8 minutes
#   bash experiments/train_scale/device_run.sh --dry-run   # CPU: the same path on a tiny preset (the test suite)
#   bash experiments/train_scale/device_run.sh --rows 128k_ckpt --budget-s 400   # one row
#
# The GPU image has torch, transformers and lightning but not hydra-core, omegaconf or antlr4-python3-runtime: put
# their wheels in .whl/ at the repository root (carried with the call); they are installed into /tmp/site here.
# W&B is not used (logger=csv).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import hydra, omegaconf" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "error: hydra-core and omegaconf are not installed and .whl/ holds no wheels — carry hydra-core, omegaconf and antlr4-python3-runtime wheels in .whl/" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# flux from this checkout when it is not installed: its Triton kernels are the kernels/ folder, imported as flux_kernels
# (and its config tree conf/ is flux.conf, as the wheel maps them)
if ! "$PY" -c "import flux, flux_kernels, flux.conf" 2>/dev/null; then
  mkdir -p /tmp/flux_path
  ln -sfn "$PWD/kernels" /tmp/flux_path/flux_kernels
  [ -e flux/conf ] || ln -s ../conf flux/conf
  export PYTHONPATH=$PWD:/tmp/flux_path${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
exec "$PY" experiments/train_scale/measure.py --python "$PY" "$@"
