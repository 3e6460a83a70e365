#!/usr/bin/env bash
# Run on the GPU machine from the repo root: the GPU tests (compiled kernels, the engine on CUDA), then the benchmark.
#   bash experiments/speed/device_run.sh OUT_DIR [bench overrides...]
# The GPU image has no install of flux, so `flux_kernels` (kernels/) and `flux.conf` (conf/) are exposed through
# symlinks, as the wheel maps them, and Hydra is not installed there, so the bench runs with --no-hydra (same
# conf/bench.yaml, same override syntax). Carry .whl (omegaconf, hydra-core, antlr4, gguf wheels) with the call.
# SKIP_TESTS=1 skips the tests.
set -uo pipefail
out=$1; shift
mkdir -p "$out"
source experiments/device_env.sh  # flux_kernels and flux.conf symlinks, the carried wheels, PYTHONPATH
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, triton, transformers as t; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', t.__version__)"
} 2>&1 | tee "$out/gpu.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # everything that runs on CUDA when it is there; the CPU-only tests ran in the suite
  { python3 -m pytest -q -p no:cacheprovider tests/test_kernels_*.py tests/test_patterns.py
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_engine.py tests/test_bench_patterns.py \
      tests/test_train_memory.py
  } > "$out/gpu_tests.log" 2>&1  # the whole log comes back; the two summaries end the reply
  grep -E "passed|failed|error" "$out/gpu_tests.log" | tail -n 4
fi
python3 -m flux.bench --no-hydra output_dir="$out" "$@" 2>&1 | grep -v '^\s*$' | tee "$out/bench.log"
