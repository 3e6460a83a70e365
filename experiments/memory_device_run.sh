#!/usr/bin/env bash
# GPU: what holds memory at the peak (experiments/memory_at_peak.py), for the two peaks that missed their targets:
# FluxModel.generate at 128k, batch 1 (dense, every other layer SA, all SA), and the 32k qwen_32k training row with
# activation checkpointing (experiments/train_scale). Then the GPU tests.
#   bash experiments/memory_device_run.sh OUT_DIR
# From the repository root on the GPU machine, with .whl/ carried (experiments/device_env.sh installs it).
set -uo pipefail
out=$1
mkdir -p "$out"
source experiments/device_env.sh
export WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
python3 experiments/speed/generate_memory.py --out "$out/generate" --length 131072 > "$out/generate.log" 2>&1
tail -n 3 "$out/generate.log"
# the training row, its python wrapped by the allocator trace (measure.py runs `<python> -m flux.train ...`)
printf '#!/bin/bash\nexec python3 %s/experiments/memory_at_peak.py --out %s/train "$@"\n' "$PWD" "$out" > /tmp/pyprof
chmod +x /tmp/pyprof
python3 experiments/train_scale/measure.py --python /tmp/pyprof --rows 32k_ckpt --budget-s 240 --out "$out/ts" \
  > "$out/train.log" 2>&1
tail -n 2 "$out/train.log"; head -n 20 "$out/train/memory_at_peak.txt" 2>/dev/null
{ python3 -m pytest -q -p no:cacheprovider tests/test_kernels_*.py tests/test_patterns.py
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_engine.py tests/test_bench_patterns.py \
    tests/test_train_memory.py
} > "$out/gpu_tests.log" 2>&1
grep -E "passed|failed|error" "$out/gpu_tests.log" | tail -n 4
