#!/usr/bin/env bash
# GPU accuracy run (issues 6 and 7), one prepared script for one H100/H200 in about 8 minutes:
#  1. the GPU recipe (configs/BUSI/recipe_scratch_gpu.yaml): BUSI stage 1 from scratch, AMP,
#     its iteration count fitted to BUDGET_S by a 40-iteration speed probe (recorded);
#  2. alongside it, the CPU recipe and its ablations (configs/BUSI/recipe_scratch_cpu.yaml with
#     overrides) and the plain detectron2 baseline (benchmarks/train_plain_baseline.py): these are
#     defined by their iteration count (fitted to ~65 min on the 2-core CPU), not by time, so
#     training them here in fp32 gives the accuracy the CPU run reaches, minutes instead of hours;
#  3. every run keeps its checkpoint by val AP50; the best CPU variant is chosen on val; then
#     the GPU recipe, the chosen CPU recipe and the baseline are evaluated ONCE on the test split
#     (bootstrap 1000) and summarized in $RESULTS/{gpu_busi,cpu_recipe_on_gpu,plain_baseline}.json.
#
# Prepare here first (the GPU machine reaches no registry):  bash benchmarks/prepare_gpu_carry.sh
# Then on the GPU machine, from the repository root:          bash benchmarks/gpu_busi.sh
# CPU dry run of the same script (tiny, to test it):          DRY_RUN=1 bash benchmarks/gpu_busi.sh
# Env: BUDGET_S (GPU-recipe training seconds, default 300), OUT, RESULTS, SKIP_VARIANTS=1.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-output/gpu_busi}
RESULTS=${RESULTS:-benchmarks/results}
LOG_DIR=${LOG_DIR:-$OUT}  # logs and test reports (small); checkpoints stay in $OUT
GPU_CFG=configs/BUSI/recipe_scratch_gpu.yaml
CPU_CFG=configs/BUSI/recipe_scratch_cpu.yaml
BUDGET_S=${BUDGET_S:-300}
PY=${PY:-python3}
mkdir -p "$OUT" "$RESULTS" "$LOG_DIR"
log() { echo "[$(date +%H:%M:%S)] $*"; }

if ! $PY -c "import detectron2" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export USDET_DATASETS=${USDET_DATASETS:-$PWD/.carry}
STATS="$USDET_DATASETS/busi/pixel_stats.json"

COMMON=(INPUT.NORMALIZATION_FILE "$STATS")
GPU_WORKERS=(DATALOADER.NUM_WORKERS "${GPU_WORKERS:-8}")  # leaves CPU cores to the runs beside it
SMALL=()
PROBE_ITERS=40
EVALS=5
VARIANT_ITERS_SCALE=1
if [ -n "${DRY_RUN:-}" ]; then
  # Same code paths on CPU: tiny model, tiny images, a handful of iterations.
  SMALL=(MODEL.DEVICE cpu SOLVER.AMP.ENABLED False MODEL.RESNETS.DEPTH 18 MODEL.RESNETS.RES2_OUT_CHANNELS 64
         INPUT.MIN_SIZE_TRAIN "(64,)" INPUT.MAX_SIZE_TRAIN 96 INPUT.MIN_SIZE_TEST 64 INPUT.MAX_SIZE_TEST 96
         DATALOADER.NUM_WORKERS 0 SOLVER.WARMUP_ITERS 2 MODEL.RPN.POST_NMS_TOPK_TEST 50
         MODEL.RPN.PRE_NMS_TOPK_TEST 100 SOLVER.IMS_PER_BATCH 2)
  PROBE_ITERS=3; BUDGET_S=${BUDGET_S_DRY:-8}; EVALS=1; VARIANT_ITERS_SCALE=0
  # ... and a 6-images-per-split subset of the carried BUSI copy, so evaluations take seconds.
  TINY="$OUT/tiny_datasets"
  $PY - "$USDET_DATASETS/busi" "$TINY/busi" <<'PYEOF'
import json, os, sys
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(os.path.join(dst, "annotations"), exist_ok=True)
for split in ("train", "val", "test"):
    d = json.load(open(os.path.join(src, "annotations", split + ".json")))
    d["images"] = d["images"][:6]
    ids = {im["id"] for im in d["images"]}
    d["annotations"] = [a for a in d["annotations"] if a["image_id"] in ids]
    for im in d["images"]:
        im["file_name"] = os.path.join(os.path.abspath(src), im["file_name"])
    json.dump(d, open(os.path.join(dst, "annotations", split + ".json"), "w"))
PYEOF
  cp "$USDET_DATASETS/busi/pixel_stats.json" "$TINY/busi/"
  export USDET_DATASETS="$TINY"
  STATS="$TINY/busi/pixel_stats.json"; COMMON=(INPUT.NORMALIZATION_FILE "$STATS")
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || log "no GPU visible"

# --- CPU recipe variants (name | overrides on recipe_scratch_cpu.yaml | iterations), plain baseline --
# Iterations fill the same ~65 min of the 2-core CPU: 680 for R50 (the baseline's count and
# per-iteration cost), 1100 for R18 (the recipe's 3.4 s/iter measured on that CPU by
# benchmarks/cpu_busi.py; the first ablation, before that measurement, used 880).
# cpu_r18 is the recipe as committed; the R50 ones are the ablations it was chosen against on val
# (recorded in benchmarks/results/cpu_recipe_880it_h200.json as cpu_full, cpu_noaug, cpu_steplr).
# The CPU recipe's summary from here is cpu_recipe_on_gpu.json: cpu_recipe.json is the real CPU run.
R50=(MODEL.RESNETS.DEPTH 50 MODEL.RESNETS.RES2_OUT_CHANNELS 256)
VARIANTS=(
  "cpu_r18||1100"
  "cpu_full|${R50[*]}|680"
  "cpu_noaug|${R50[*]} INPUT.AUG.BRIGHTNESS 0.0 INPUT.AUG.CONTRAST 0.0 INPUT.AUG.GAMMA 0.0 INPUT.AUG.SPECKLE 0.0 INPUT.AUG.RANDOM_RESIZED_CROP.ENABLED False|680"
  "cpu_steplr|${R50[*]} SOLVER.LR_SCHEDULER_NAME WarmupMultiStepLR SOLVER.STEPS (510,612)|680"
)
variant_iters() { if [ "$VARIANT_ITERS_SCALE" = 0 ]; then echo 6; else echo "$1"; fi; }
PIDS=()
if [ -z "${SKIP_VARIANTS:-}" ]; then
  for v in "${VARIANTS[@]}"; do
    IFS='|' read -r name extra iters <<< "$v"
    it=$(variant_iters "$iters"); ev=$(( it / 4 )); [ "$ev" -ge 1 ] || ev=$it
    # shellcheck disable=SC2086
    $PY tools/train_net.py --config-file "$CPU_CFG" ${extra} SOLVER.MAX_ITER "$it" TEST.EVAL_PERIOD "$ev" \
      SOLVER.CHECKPOINT_PERIOD "$ev" DATALOADER.NUM_WORKERS 2 "${COMMON[@]}" "${SMALL[@]}" \
      OUTPUT_DIR "$OUT/$name" > "$LOG_DIR/$name.log" 2>&1 &
    PIDS+=($!)
    log "started $name ($it iterations)"
  done
  bit=$(variant_iters 680)
  $PY benchmarks/train_plain_baseline.py --output "$OUT/plain_baseline" SOLVER.MAX_ITER "$bit" \
    DATALOADER.NUM_WORKERS 2 "${SMALL[@]}" > "$LOG_DIR/plain_baseline.log" 2>&1 &
  PIDS+=($!)
  log "started plain_baseline ($bit iterations)"
fi

# --- GPU recipe: speed probe, then the fitted run --------------------------------------------
log "GPU recipe speed probe ($PROBE_ITERS iterations)"
$PY tools/train_net.py --config-file "$GPU_CFG" SOLVER.MAX_ITER $PROBE_ITERS TEST.EVAL_PERIOD 0 DATASETS.TEST "()" \
  SOLVER.CHECKPOINT_PERIOD 100000 SOLVER.BEST_CHECKPOINT.ENABLED False "${GPU_WORKERS[@]}" "${COMMON[@]}" "${SMALL[@]}" \
  OUTPUT_DIR "$OUT/probe" > "$LOG_DIR/probe.log" 2>&1 || { tail -40 "$LOG_DIR/probe.log"; }
MAX_ITER=$($PY - "$OUT/probe/metrics.json" "$BUDGET_S" <<'PYEOF'
import json, statistics, sys
try:
    recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
    sec = statistics.median([r["time"] for r in recs if "time" in r][-20:])
except Exception:
    sec = 0.25  # probe failed: assume a conservative speed
print(max(20, int(float(sys.argv[2]) / sec) // 10 * 10))
PYEOF
)
EVAL_PERIOD=$(( MAX_ITER / EVALS ))
log "GPU recipe: $MAX_ITER iterations, eval on val every $EVAL_PERIOD"
T0=$(date +%s)
$PY tools/train_net.py --config-file "$GPU_CFG" SOLVER.MAX_ITER "$MAX_ITER" TEST.EVAL_PERIOD "$EVAL_PERIOD" \
  SOLVER.CHECKPOINT_PERIOD "$EVAL_PERIOD" "${GPU_WORKERS[@]}" "${COMMON[@]}" "${SMALL[@]}" OUTPUT_DIR "$OUT/gpu_recipe" \
  > "$LOG_DIR/gpu_recipe.log" 2>&1
GPU_RC=$?
T1=$(date +%s)
log "GPU recipe finished (exit $GPU_RC) in $((T1 - T0)) s"
for p in "${PIDS[@]}"; do wait "$p" || log "a CPU-recipe run exited non-zero (pid $p): see its log"; done
log "all training done"

# --- choose the CPU variant on val, then evaluate each recipe once on test ---------------------
CHOSEN=$($PY - "$OUT" <<'PYEOF'
import json, os, sys
best = None
for name in ("cpu_full", "cpu_noaug", "cpu_steplr", "cpu_r18"):
    p = os.path.join(sys.argv[1], name, "best_metric.json")
    if os.path.isfile(p):
        v = json.load(open(p)).get("value")
        if v is not None and (best is None or v > best[1]):
            best = (name, v)
print(best[0] if best else "")
PYEOF
)
log "CPU recipe chosen on val: ${CHOSEN:-none}"
weights_of() { if [ -f "$1/model_best.pth" ]; then echo "$1/model_best.pth"; else echo "$1/model_final.pth"; fi; }
EPIDS=()
TEST_OPTS=(DATASETS.TEST "('busi_test',)" TEST.BOOTSTRAP 1000)
$PY tools/train_net.py --config-file "$GPU_CFG" --eval-only MODEL.WEIGHTS "$(weights_of "$OUT/gpu_recipe")" \
  "${TEST_OPTS[@]}" "${COMMON[@]}" "${SMALL[@]}" OUTPUT_DIR "$OUT/gpu_recipe_test" > "$LOG_DIR/gpu_recipe_test.log" 2>&1 &
EPIDS+=($!)
if [ -n "$CHOSEN" ]; then
  for v in "${VARIANTS[@]}"; do
    IFS='|' read -r name extra iters <<< "$v"
    [ "$name" = "$CHOSEN" ] || continue
    # shellcheck disable=SC2086
    $PY tools/train_net.py --config-file "$CPU_CFG" --eval-only ${extra} MODEL.WEIGHTS "$(weights_of "$OUT/$name")" \
      "${TEST_OPTS[@]}" "${COMMON[@]}" "${SMALL[@]}" OUTPUT_DIR "$OUT/cpu_recipe_test" > "$LOG_DIR/cpu_recipe_test.log" 2>&1 &
    EPIDS+=($!)
  done
fi
if [ -f "$OUT/plain_baseline/model_final.pth" ]; then
  $PY tools/train_net.py --config-file "$OUT/plain_baseline/config.yaml" --eval-only \
    MODEL.WEIGHTS "$OUT/plain_baseline/model_final.pth" INPUT.NORMALIZATION config "${TEST_OPTS[@]}" "${SMALL[@]}" \
    OUTPUT_DIR "$OUT/plain_baseline_test" > "$LOG_DIR/plain_baseline_test.log" 2>&1 &
  EPIDS+=($!)
fi
for p in "${EPIDS[@]}"; do wait "$p" || log "an evaluation exited non-zero (pid $p): see its log"; done
log "test evaluations done"

SUM=(--results "$RESULTS")
$PY benchmarks/summarize_run.py --name gpu_busi --config "$GPU_CFG" --train-dir "$OUT/gpu_recipe" \
  --test-dir "$OUT/gpu_recipe_test" --train-seconds $((T1 - T0)) --max-iter "$MAX_ITER" "${SUM[@]}" || true
if [ -n "$CHOSEN" ]; then
  $PY benchmarks/summarize_run.py --name cpu_recipe_on_gpu --config "$CPU_CFG" --train-dir "$OUT/$CHOSEN" \
    --test-dir "$OUT/cpu_recipe_test" --variant "$CHOSEN" --ablation-root "$OUT" "${SUM[@]}" || true
fi
$PY benchmarks/summarize_run.py --name plain_baseline --config benchmarks/train_plain_baseline.py \
  --train-dir "$OUT/plain_baseline" --test-dir "$OUT/plain_baseline_test" "${SUM[@]}" || true
for run in gpu_recipe_test cpu_recipe_test plain_baseline_test; do
  rep="$OUT/$run/inference/busi_test"
  [ -d "$rep" ] && mkdir -p "$LOG_DIR/$run" && cp "$rep"/*.md "$rep"/*.png "$rep"/metrics.json "$LOG_DIR/$run/" 2>/dev/null
done
log "done; summaries in $RESULTS, logs and test reports in $LOG_DIR"
