#!/usr/bin/env bash
# One prepared run for a time-limited GPU (BUDGET_S seconds in all), everything under OUTDIR.
#
#   benchmarks/gpu_run.sh OUTDIR            # on the GPU machine (PYTHONPATH=. or pip install -e)
#   benchmarks/gpu_run.sh OUTDIR --dry-run  # rehearsal on a CPU: tiny model, same steps
#
# PACK=FILE.tgz also packs OUTDIR's small files (no weights) into FILE after every step, so a run
# cut short still hands back what it finished. Resumable: a finished step leaves
# OUTDIR/<step>.done and is skipped on a re-run; the profiler resumes its own cells, the e2e its
# prune runs and finished budgets. Each step has a hard time limit, so the run stays inside
# BUDGET_S. The steps, in order of what the run is for:
#   1. env;
#   2. the latency table: the one shipped in profiles/<gpu>/ when it was timed on this GPU model
#      (copied into OUTDIR), else a new profile of ResNet-50 b32 fp32 (width 0.5 + 40 random
#      nets, 2 rounds);
#   3. the end-to-end measurement at latency budget 0.5: train ResNet-50 on digits at 224 px,
#      prune with the latency config and with the FLOPs config to equal FLOPs, convert both,
#      time both against the full net (bench's protocol, CUDA-graph replay);
#   4. a gated training step against a plain one (bench_gates.py), then the e2e at budget
#      0.35 (budget 0.5 comes from its cache);
#   5. the table's third round (the profiler resumes the shipped cells), if time is left;
#   6. the CUDA tests.
# make-config and validate are CPU work: run them on the returned table, not on the GPU's time.
#
# Measured on an H200 (2026-12-04): a profile cell takes 0.65 s once cudnn has tuned its conv
# shapes and 3.6 s for a random net's first cell (about 50 new shapes), so the 78-variant table
# needs 183 s for its first round and 45 s for each further one; an epoch of ResNet-50 on digits
# at 224 px takes about 2 s.
set -uo pipefail

OUT=${1:?usage: benchmarks/gpu_run.sh OUTDIR [--dry-run]}
DRY=${2:-}
mkdir -p "$OUT"
LOG="$OUT/run.log"
START=$(date +%s)
BUDGET_S=${BUDGET_S:-540}
PACK=${PACK:-}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")

DEV=cuda MODEL=resnet50 BATCH=32 NETS=40 SIZE=224 SLUG=h200
E2E=(--base-epochs 12 --base-optimizer adamw --epochs 10 --amp bfloat16 --train-threads 16
  --repeats 3 --rounds 3)
B1=0.5 B2=0.35
if [ "$DRY" = "--dry-run" ]; then
  DEV=cpu MODEL=resnet20 BATCH=8 NETS=8 SIZE=32 SLUG=dry-cpu
  E2E=(--base-epochs 2 --base-optimizer adamw --epochs 3 --train-threads 2 --repeats 1
    --rounds 2)
  B1=0.8 B2=0.7
fi
PY=${PYTHON:-python}

left() { echo $((BUDGET_S - ($(date +%s) - START))); }

pack() {
  [ -n "$PACK" ] || return 0
  tar czf "$PACK.tmp" -C "$OUT" --exclude='*.safetensors' --exclude='*.pt' . 2>/dev/null \
    && mv "$PACK.tmp" "$PACK"
}

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  if [ -f "$OUT/$name.done" ]; then
    echo "[$(date +%T)] $name: done before, skipped" | tee -a "$LOG"
    return 0
  fi
  if [ "$(left)" -lt 20 ]; then
    echo "[$(date +%T)] $name: skipped, $(left) s of the budget left" | tee -a "$LOG"
    return 0
  fi
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  if [ "$limit" -lt 10 ]; then
    echo "[$(date +%T)] $name: skipped, a limit of $limit s" | tee -a "$LOG"
    return 0
  fi
  local t0 rc
  t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "[$(date +%T)] $name: rc $rc in $(($(date +%s) - t0)) s (limit $limit s)" | tee -a "$LOG"
  [ $rc -eq 0 ] && touch "$OUT/$name.done"
  [ $rc -ne 0 ] && tail -n 5 "$OUT/$name.log" | sed "s/^/    $name| /" | tee -a "$LOG"
  pack
  return 0
}

# 1. what the machine is
step env 30 bash -c "nvidia-smi || true; nproc; $PY -c 'import torch, torchvision, sys;
print(sys.version); print(torch.__version__, torchvision.__version__, torch.version.cuda);
print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"no CUDA\")'"

# 2. the table: the shipped one if it was timed on this GPU model, else a new profile
NAME="${MODEL}_b${BATCH}_float32"
TABLE="$OUT/profiles/$SLUG/$NAME.csv"
SHIPPED="$ROOT/profiles/$SLUG/$NAME"
PROFILE=("$PY" -m gator_hw profile "$MODEL" --device "$DEV" --batch-size "$BATCH" --widths 0.5
  --random-nets "$NETS" --out "$TABLE" --quiet)
if [ ! -f "$TABLE" ] && [ -f "$SHIPPED.json" ] && "$PY" - "$SHIPPED.json" "$DEV" <<'EOF'
import json, sys
import torch
from gator_hw.profile.device import _device_name
here = _device_name(torch.device(sys.argv[2]))
sys.exit(json.load(open(sys.argv[1]))["device"]["device_name"] != here)
EOF
then
  mkdir -p "$(dirname "$TABLE")" && cp "$SHIPPED".* "$SHIPPED"_gator.csv "$(dirname "$TABLE")/"
  echo "[$(date +%T)] table: the shipped $SHIPPED.csv (timed on this device model)" | tee -a "$LOG"
fi
[ -f "$TABLE" ] || step profile_fp32 300 "${PROFILE[@]}" --rounds 2

# 3. the measured gain: latency config vs FLOPs config at equal FLOPs, converted and timed
E2E_RUN=("$PY" "$HERE/e2e_latency.py" --out "$OUT/e2e" --table "$TABLE" --model "$MODEL"
  --input-size "$SIZE" --batch-size "$BATCH" --device "$DEV" "${E2E[@]}")
[ -f "$TABLE" ] && step e2e_b1 $(($(left) - 40)) "${E2E_RUN[@]}" --budgets "$B1"

# 3b. the gated step against a plain one (cost model and projection every step), ~20 s
CONFIG="$OUT/e2e/cfg/latency.json"
[ -f "$CONFIG" ] && step bench_gates 60 "$PY" "$HERE/bench_gates.py" --model "$MODEL" \
  --size "$SIZE" --batch 64 --device "$DEV" --config "$CONFIG" --target latency=0.5 \
  --repeats 10

# 4. a deeper budget (budget 1 is reused from its cache)
[ -f "$TABLE" ] && step e2e_b2 $(($(left) - 40)) "${E2E_RUN[@]}" --budgets "$B1,$B2"

# 5. the table's third round, only with time to spare (a fresh process re-tunes cudnn: ~170 s)
if [ -f "$TABLE" ] && [ "$(left)" -gt 230 ]; then
  step profile_round3 $(($(left) - 40)) "${PROFILE[@]}" --rounds 3
else
  echo "[$(date +%T)] profile_round3: not started, $(left) s left" | tee -a "$LOG"
fi

# 6. the tests that need CUDA (they skip elsewhere)
step tests 45 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_profile.py \
  tests/test_train.py tests/test_features.py tests/test_calibration.py -k "cuda or gpu or device"
echo "[$(date +%T)] total $(($(date +%s) - START)) s" | tee -a "$LOG"
command -v nvidia-smi > /dev/null && nvidia-smi --format=csv \
  --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu | tee "$OUT/gpu_state.csv"
for f in "$OUT"/profile_*.log "$OUT/bench_gates.log" "$OUT/e2e/results.md"; do
  [ -f "$f" ] && { echo "== $f"; tail -n 25 "$f"; }
done
pack
