#!/usr/bin/env bash
# One prepared run for a time-limited GPU (about 8 minutes in all), everything under OUTDIR.
#
#   benchmarks/gpu_run.sh OUTDIR            # on the GPU machine (PYTHONPATH=. or pip install -e)
#   benchmarks/gpu_run.sh OUTDIR --dry-run  # rehearsal on a CPU: tiny model, same steps
#
# Resumable: a finished step leaves OUTDIR/<step>.done and is skipped on a re-run; the profiler
# resumes its own cells. Each step has a hard time limit (below), so the whole run stays inside
# its budget; the optional bf16 step only starts when enough of the budget is left.
#
# Time estimates (ResNet-50, batch 32, widths 0.5): 37 edges + 40 random nets + the baseline =
# 78 variants x 3 rounds = 234 cells; a cell is slim + copy + graph capture + warm-up + 10
# blocks of >= 5 ms, about 0.5-1 s on an H100/H200, so 2-4 min per dtype.
set -uo pipefail

OUT=${1:?usage: benchmarks/gpu_run.sh OUTDIR [--dry-run]}
DRY=${2:-}
mkdir -p "$OUT"
LOG="$OUT/run.log"
START=$(date +%s)
BUDGET_S=${BUDGET_S:-480}

DEV=cuda MODEL=resnet50 BATCH=32 NETS=40 SIZE=224
if [ "$DRY" = "--dry-run" ]; then
  DEV=cpu MODEL=resnet20 BATCH=8 NETS=8 SIZE=32
fi
PY=${PYTHON:-python}

left() { echo $((BUDGET_S - ($(date +%s) - START))); }

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
  local t0 rc
  t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "[$(date +%T)] $name: rc $rc in $(($(date +%s) - t0)) s (limit $limit s)" | tee -a "$LOG"
  [ $rc -eq 0 ] && touch "$OUT/$name.done"
  return 0
}

# 1. what the machine is
step env 30 bash -c "nvidia-smi || true; $PY -c 'import torch, torchvision, sys;
print(sys.version); print(torch.__version__, torchvision.__version__, torch.version.cuda);
print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"no CUDA\")'"

# 2. the tests that need CUDA (they skip elsewhere)
step tests 90 "$PY" -m pytest -q -rs tests/test_profile.py tests/test_train.py -k "cuda or gpu"

# 3. profile fp32 (graph replay), width 0.5, random nets: the table the cost model needs
TABLE="$OUT/profiles/${MODEL}_b${BATCH}_float32.csv"
step profile_fp32 240 "$PY" -m gator_hw profile "$MODEL" --device "$DEV" --batch-size "$BATCH" \
  --widths 0.5 --random-nets "$NETS" --rounds 3 --out "$TABLE" --quiet

# 4. cost model and config from it (CPU work, seconds)
step config 60 "$PY" -m gator_hw make-config --tables "$TABLE" --out "$OUT/cfg/${MODEL}.json" \
  --model-out "$OUT/cfg/${MODEL}.costmodel.json"
step validate 60 "$PY" -m gator_hw validate --model-file "$OUT/cfg/${MODEL}.costmodel.json"

# 5. one converted net (every edge at half width), timed against the full one, graph and eager
step convert_half 60 "$PY" - "$MODEL" "$SIZE" "$OUT/half" <<'EOF'
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
step bench_graph 60 "$PY" -m gator_hw bench "$OUT/half" --device "$DEV" --batch-size "$BATCH" \
  --rounds 5
if [ "$DEV" = cuda ]; then  # the eager-vs-graph regime check: launch-bound or not
  step bench_eager 60 "$PY" -m gator_hw bench "$OUT/half" --device "$DEV" \
    --batch-size "$BATCH" --rounds 5 --eager
  # ABBA-interleaved graph replays (opt-in on CUDA until this shows it agrees with bench_graph)
  step bench_graph_abba 60 "$PY" -m gator_hw bench "$OUT/half" --device "$DEV" \
    --batch-size "$BATCH" --rounds 5 --interleave
fi

# 6. bf16 channels-last, only with time to spare
if [ "$(left)" -gt 200 ] || [ -f "$OUT/profile_bf16.done" ]; then
  step profile_bf16 $(($(left) - 20)) "$PY" -m gator_hw profile "$MODEL" --device "$DEV" \
    --batch-size "$BATCH" --widths 0.5 --random-nets "$NETS" --rounds 3 --dtype bfloat16 \
    --channels-last --out "$OUT/profiles/${MODEL}_b${BATCH}_bfloat16_cl.csv" --quiet
else
  echo "[$(date +%T)] profile_bf16: not started, $(left) s left" | tee -a "$LOG"
fi
echo "[$(date +%T)] total $(($(date +%s) - START)) s" | tee -a "$LOG"
