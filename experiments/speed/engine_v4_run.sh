#!/usr/bin/env bash
# The fourth H200 run of the engine (experiments/speed/h200_engine_v4), in two calls of under 600 s each:
#   bash experiments/speed/engine_v4_run.sh a OUT_DIR   # engine GPU tests, the projection step's TTFT and memory,
#                                                       # what generate holds at its peak, batch-1 rows 32k-256k
#   bash experiments/speed/engine_v4_run.sh b OUT_DIR   # batch 8 and the largest batch at 128k (with their batch-1 rows)
set -uo pipefail
part=$1; out=$2
mkdir -p "$out"
source experiments/device_env.sh
bench() {  # the generate section alone, with these jobs
  SKIP_TESTS=1 bash experiments/speed/device_run.sh "$out" checks.enabled=false kernels.enabled=false \
    router.enabled=false patterns.enabled=false "generate.jobs=$1" | tail -n 16
}
case $part in
  a)
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_engine.py > "$out/gpu_tests.log" 2>&1
    grep -E "passed|failed|error" "$out/gpu_tests.log" | tail -n 2
    python3 experiments/speed/projection_chunks.py --length 131072 --mib 128,64,32 > "$out/projection.log" 2>&1
    tail -n 6 "$out/projection.log"
    python3 experiments/speed/generate_memory.py --out "$out/memory" --length 131072 > "$out/memory.log" 2>&1
    tail -n 3 "$out/memory.log"
    bench '[{batch: 1, length: 32768, plans: [dense, router@1.0]}, {batch: 1, length: 131072, plans: [dense, router@0.5, router@1.0]}, {batch: 1, length: 262144, plans: [dense, router@0.5]}]' ;;
  b)
    bench '[{batch: 1, length: 131072, plans: [dense, router@0.5]}, {batch: 8, length: 131072, plans: [dense, router@0.5]}, {batch: max, length: 131072, plans: [dense, router@0.5]}]' ;;
  *) echo "error: part must be a or b, got '$part'" >&2; exit 2 ;;
esac
