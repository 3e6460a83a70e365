#!/usr/bin/env bash
# The third H200 run of the engine (experiments/speed/h200_engine_v3): the GPU-marked tests, what generate holds at
# its memory peak at 128k (generate_memory.py), then the generate rows of the engine issue's targets and the
# patterns section at 128k and 256k.
#   bash experiments/speed/engine_v3_run.sh OUT_DIR
set -uo pipefail
out=$1
mkdir -p "$out"
source experiments/device_env.sh
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_engine.py tests/test_kernels_split_k.py \
  tests/test_kernels_prefill.py tests/test_kernels_decode.py tests/test_patterns.py tests/test_bench_patterns.py \
  > "$out/gpu_tests.log" 2>&1
grep -E "passed|failed|error" "$out/gpu_tests.log" | tail -n 2
python3 experiments/speed/generate_memory.py --out "$out/memory" --length 131072 > "$out/memory.log" 2>&1
tail -n 3 "$out/memory.log"
SKIP_TESTS=1 bash experiments/speed/device_run.sh "$out" checks.enabled=false kernels.enabled=false \
  router.enabled=false patterns.enabled=true 'patterns.lengths=[131072,262144]' \
  'generate.jobs=[{batch: 1, length: 32768, plans: [dense, router@0.5, router@1.0, replay@0.5]}, {batch: 1, length: 131072, plans: [dense, router@0.5, static@0.5, router@1.0]}, {batch: 8, length: 131072, plans: [dense, router@0.5]}, {batch: max, length: 131072, plans: [dense, router@0.5]}]' \
  | tail -n 30
