#!/usr/bin/env bash
# GPU accuracy run (issue 6/7): train stage 1 on BUSI from scratch on one H100/H200 within a time
# budget, pick the checkpoint on the val split, evaluate it once on the test split, and write
# AP50, penalized IoU, CPM and images/s to $RESULTS/gpu_busi.json.
#
# Prepare here first (the GPU machine reaches no registry):  bash benchmarks/prepare_gpu_carry.sh
# Then on the GPU machine, from the repository root:          bash benchmarks/gpu_busi.sh
# CPU dry run of the same script (tiny, to test it):          DRY_RUN=1 bash benchmarks/gpu_busi.sh
#
# Env: BUDGET_S (training seconds, default 420), OUT (work folder), RESULTS (where the summary goes),
#      CFG (recipe config). The iteration count is fitted to BUDGET_S by a 40-iteration speed probe
#      and recorded with the result, so the run is reproducible from the summary.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-output/gpu_busi}
RESULTS=${RESULTS:-benchmarks/results}
CFG=${CFG:-configs/BUSI/recipe_scratch_gpu.yaml}
BUDGET_S=${BUDGET_S:-420}
PY=${PY:-python3}
mkdir -p "$OUT" "$RESULTS"

if ! $PY -c "import detectron2" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export USDET_DATASETS=${USDET_DATASETS:-$PWD/.carry}

EXTRA=()
PROBE_ITERS=40
if [ -n "${DRY_RUN:-}" ]; then
  # Same code path on CPU: tiny model, tiny images, a handful of iterations.
  EXTRA=(MODEL.DEVICE cpu SOLVER.AMP.ENABLED False SOLVER.IMS_PER_BATCH 2 MODEL.RESNETS.DEPTH 18
         MODEL.RESNETS.RES2_OUT_CHANNELS 64 INPUT.MIN_SIZE_TRAIN "(96,)" INPUT.MAX_SIZE_TRAIN 128
         INPUT.MIN_SIZE_TEST 96 INPUT.MAX_SIZE_TEST 128 DATALOADER.NUM_WORKERS 0 SOLVER.WARMUP_ITERS 2)
  PROBE_ITERS=3
  BUDGET_S=${BUDGET_S_DRY:-12}
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU visible"

echo "== speed probe ($PROBE_ITERS iterations)"
$PY tools/train_net.py --config-file "$CFG" SOLVER.MAX_ITER $PROBE_ITERS TEST.EVAL_PERIOD 0 \
  SOLVER.CHECKPOINT_PERIOD 100000 SOLVER.BEST_CHECKPOINT.ENABLED False OUTPUT_DIR "$OUT/probe" "${EXTRA[@]}" \
  > "$OUT/probe.log" 2>&1 || { tail -50 "$OUT/probe.log"; exit 1; }
MAX_ITER=$($PY - "$OUT/probe/metrics.json" "$BUDGET_S" <<'PYEOF'
import json, statistics, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
times = [r["time"] for r in recs if "time" in r][-20:]
sec = statistics.median(times)
print(max(20, int(float(sys.argv[2]) / sec) // 10 * 10))
PYEOF
)
EVAL_PERIOD=$(( MAX_ITER / 5 ))
echo "== training $MAX_ITER iterations (eval on val every $EVAL_PERIOD)"
T0=$(date +%s)
$PY tools/train_net.py --config-file "$CFG" SOLVER.MAX_ITER $MAX_ITER TEST.EVAL_PERIOD $EVAL_PERIOD \
  SOLVER.CHECKPOINT_PERIOD $EVAL_PERIOD OUTPUT_DIR "$OUT/train" "${EXTRA[@]}" > "$OUT/train.log" 2>&1 \
  || { tail -80 "$OUT/train.log"; exit 1; }
T1=$(date +%s)
WEIGHTS="$OUT/train/model_best.pth"
[ -f "$WEIGHTS" ] || WEIGHTS="$OUT/train/model_final.pth"
echo "== test-split evaluation of $WEIGHTS (chosen on val)"
$PY tools/train_net.py --config-file "$CFG" --eval-only MODEL.WEIGHTS "$WEIGHTS" DATASETS.TEST "('busi_test',)" \
  OUTPUT_DIR "$OUT/test" TEST.BOOTSTRAP 1000 "${EXTRA[@]}" > "$OUT/test.log" 2>&1 || { tail -80 "$OUT/test.log"; exit 1; }
$PY benchmarks/summarize_run.py --name "${RESULT_NAME:-gpu_busi}" --config "$CFG" --train-dir "$OUT/train" \
  --test-dir "$OUT/test" --train-seconds $((T1 - T0)) --max-iter $MAX_ITER --results "$RESULTS"
