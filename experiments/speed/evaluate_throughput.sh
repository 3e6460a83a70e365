#!/usr/bin/env bash
# flux.evaluate throughput on the GPU (SmolLM2, RULER-style 4k, the shipped router): the code before the engine
# (commit 57ba4dc: transformers' forward + RoutedCache + a Python decode loop) against the code now (the engine).
#   bash experiments/speed/evaluate_throughput.sh SMOLLM2_GGUF OUT_DIR
# SMOLLM2_GGUF must keep the file name SmolLM2-135M-Instruct.Q4_1.gguf: the backbone's name, which the router's
# card is checked against, comes from it (a copy named otherwise is another backbone to flux).
# Run from the repo root on the GPU machine after device_run.sh's setup (flux_kernels / flux.conf links, wheels in
# /tmp/site). The old code is `git archive 57ba4dc flux kernels conf` unpacked into .before/ (carried with the call).
set -uo pipefail
gguf=$1; out=$2
if [ "$(basename "$gguf")" != SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  echo "error: $gguf: name the file SmolLM2-135M-Instruct.Q4_1.gguf (the shipped router is checked against that backbone name)" >&2
  exit 2
fi
mkdir -p "$out" /tmp/before_pkgs /tmp/before_cwd
ln -sfn "$PWD/.before/flux" /tmp/before_pkgs/flux
ln -sfn "$PWD/.before/kernels" /tmp/before_pkgs/flux_kernels
ln -sfn "$PWD/.before/conf" /tmp/before_pkgs/conf
tasks="[niah_single,niah_multikey,niah_multivalue,kv_lookup,variable_tracking,fwe,cwe,continuation,summary_like]"
common=(backbone.source="$gguf" device=cuda eval=ruler "eval.task.tasks=$tasks" "eval.task.lengths=[4096]"
        eval.task.n=10 eval.task.seed=7 eval.task.max_new_tokens=64 eval.batch_size=16 routing.mode=router
        routing.checkpoint="$PWD/experiments/smollm2_8k/router" sparse.sink=64 sparse.window=256)
timed() {  # label, working dir, PYTHONPATH, output folder
  local label=$1 dir=$2 path=$3 run=$4 t0 t1
  t0=$(date +%s.%N)
  (cd "$dir" && PYTHONPATH="$path" python3 -m flux.evaluate "${common[@]}" output_dir="$run" hydra.run.dir="$run") \
    > "$out/$label.log" 2>&1
  local rc=$?
  t1=$(date +%s.%N)
  python3 -c "import json,sys; r=json.load(open('$run/results.json'));n=sum(x['n'] for x in r['results']);s=$t1-$t0;\
print(f'$label rc=$rc seconds={s:.1f} samples={n} samples_per_s={n/s:.2f} score={r[\"summary\"][\"score\"]:.3f} '\
f'sparsity={r[\"summary\"][\"sparsity\"]:.3f}')" | tee -a "$out/throughput.txt"
}
now_path="/tmp/flux_pkgs:$PWD:/tmp/site"
timed warmup "$PWD" "$now_path" /tmp/ev_warmup          # pays the one-time GGUF de-quantisation
timed before /tmp/before_cwd "/tmp/before_pkgs:/tmp/site" /tmp/ev_before
timed engine "$PWD" "$now_path" /tmp/ev_engine
