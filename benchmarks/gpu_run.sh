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
# BUDGET_S; the steps come in order of what the run is for:
#   1. env; 2. profile ResNet-50 b32 fp32 (width 0.5 + 40 random nets, 3 rounds: the table; if
#      cut short, the finished cells of 2 rounds make the table);
#   3. the end-to-end measurement at latency budget 0.5: prune with the latency config and with
#      the FLOPs config to equal FLOPs, convert both, time both against the full net;
#   4. the eager / graph / ABBA regime check on one converted net;
#   5. the e2e at budget 0.35 if time is left; 6. the CUDA tests.
# make-config and validate are CPU work: run them on the returned table, not on the GPU's time.
#
# Time estimates (ResNet-50, batch 32): 78 variants x 3 rounds = 234 cells of slim + copy +
# capture + warm-up + 10 blocks, about 0.5-1 s each, so 2-4 min; the e2e trains ResNet-50 on
# digits at 224 px (bf16 autocast, 22 steps an epoch) and times 3 nets, about 2-3 min a budget.
set -uo pipefail

OUT=${1:?usage: benchmarks/gpu_run.sh OUTDIR [--dry-run]}
DRY=${2:-}
mkdir -p "$OUT"
LOG="$OUT/run.log"
START=$(date +%s)
BUDGET_S=${BUDGET_S:-540}
PACK=${PACK:-}
HERE=$(cd "$(dirname "$0")" && pwd)

DEV=cuda MODEL=resnet50 BATCH=32 NETS=40 SIZE=224 SLUG=h200
E2E=(--base-epochs 10 --epochs 10 --amp bfloat16 --train-threads 16 --repeats 3 --rounds 3)
B1=0.5 B2=0.35
if [ "$DRY" = "--dry-run" ]; then
  DEV=cpu MODEL=resnet20 BATCH=8 NETS=8 SIZE=32 SLUG=dry-cpu
  E2E=(--base-epochs 2 --epochs 3 --train-threads 2 --repeats 1 --rounds 2)
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

# 2. profile fp32 (graph replay), width 0.5, random nets: the table the cost model needs
TABLE="$OUT/profiles/$SLUG/${MODEL}_b${BATCH}_float32.csv"
PROFILE=("$PY" -m gator_hw profile "$MODEL" --device "$DEV" --batch-size "$BATCH" --widths 0.5
  --random-nets "$NETS" --out "$TABLE" --quiet)
step profile_fp32 250 "${PROFILE[@]}" --rounds 3
[ -f "$TABLE" ] || step profile_fp32_2rounds 80 "${PROFILE[@]}" --rounds 2

# 3. the measured gain: latency config vs FLOPs config at equal FLOPs, converted and timed
E2E_RUN=("$PY" "$HERE/e2e_latency.py" --out "$OUT/e2e" --table "$TABLE" --model "$MODEL"
  --input-size "$SIZE" --batch-size "$BATCH" --device "$DEV" "${E2E[@]}")
[ -f "$TABLE" ] && step e2e_b1 $(($(left) - 45)) "${E2E_RUN[@]}" --budgets "$B1"

# 4. one converted net (every edge at half width), timed against the full one: graph replay,
# eager (launch-bound or not) and ABBA-interleaved graph replays
step convert_half 40 "$PY" - "$MODEL" "$SIZE" "$OUT/half" <<'EOF'
import sys
from gator_hw.convert import convert
from gator_hw.io import save
from gator_hw.network import load_network
name, size, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
net = load_network(name, input_size=size)
keep = {i: list(range(max(1, e.channels // 2))) for i, e in enumerate(net.graph.edges)
        if e.prunable}
save(out, convert(net.model, net.graph, keep), name=name, num_classes=net.num_classes,
     input_size=size, graph=net.graph, keep=keep)
print("saved", out)
EOF
BENCH=(-m gator_hw bench "$OUT/half" --device "$DEV" --batch-size "$BATCH" --rounds 5)
step bench_graph 30 "$PY" "${BENCH[@]}"
if [ "$DEV" = cuda ]; then
  step bench_eager 30 "$PY" "${BENCH[@]}" --eager
  step bench_graph_abba 30 "$PY" "${BENCH[@]}" --interleave
fi

# 5. a deeper budget, only with time to spare (budget 1 is reused from its cache)
if [ -f "$TABLE" ] && { [ "$(left)" -gt 170 ] || [ -f "$OUT/e2e_b2.done" ]; }; then
  step e2e_b2 $(($(left) - 50)) "${E2E_RUN[@]}" --budgets "$B1,$B2"
else
  echo "[$(date +%T)] e2e_b2: not started, $(left) s left" | tee -a "$LOG"
fi

# 6. the tests that need CUDA (they skip elsewhere)
step tests 45 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_profile.py \
  tests/test_train.py -k "cuda or gpu"
echo "[$(date +%T)] total $(($(date +%s) - START)) s" | tee -a "$LOG"
command -v nvidia-smi > /dev/null && nvidia-smi --format=csv \
  --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu | tee "$OUT/gpu_state.csv"
for f in "$OUT"/profile_fp32*.log "$OUT/e2e/results.md" "$OUT"/bench_*.log; do
  [ -f "$f" ] && { echo "== $f"; tail -n 25 "$f"; }
done
pack
