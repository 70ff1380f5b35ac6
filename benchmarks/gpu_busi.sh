#!/usr/bin/env bash
# The GPU contest (issue 21 item 3), one prepared script for one H100/H200 (planned: about 9 minutes):
# usdet's GPU recipe (configs/BUSI/recipe_scratch_gpu.yaml: the light family of the CPU recipe,
# batch 16, AMP) and Ultralytics YOLOv8n from scratch, back to back on the same GPU, each with the
# same wall-clock budget (BUDGET_MIN minutes, default 3), run by benchmarks/contest.py under its
# rules: the budget is training plus each side's own val passes; the same loader workers (WORKERS,
# default 12), device and AMP setting for both; the same test-time caps (score >= 0.001, <= 100
# boxes); the checkpoint chosen on val AP; one scorer, paired on BUSI test by compare_models.
#
#   Prepare here (the GPU machine reaches no registry):  bash benchmarks/prepare_gpu_carry.sh
#   On the GPU machine, from the repository root:       bash benchmarks/gpu_busi.sh
#   CPU smoke run (a few iterations on a few images):    bash benchmarks/gpu_busi.sh --smoke
# With this workplace's device tool: run(command="bash benchmarks/gpu_busi.sh", carry=[".carry"],
# timeout_s=600) from the checkout that holds .carry/; the files that come back ($OUT) go into
# benchmarks/results/ (gpu_contest.json, gpu_contest/{usdet,yolo}_{val,test}.json).
#
# Writes $RESULTS/$RESULT_NAME.json and $RESULTS/$RESULT_NAME/ (both sides' val and test
# predictions): benchmarks/results/gpu_contest* on a GPU, output/gpu_busi_smoke/results/ for
# --smoke. Where $OUT is set (the device tool's return folder) it also copies them there, with a
# tarball of the logs. The peer runs from benchmarks/.venv-peer when it is ready, else from the
# carried wheels (.carry/peer_whl); a smoke run without either runs usdet alone and records why.
# Env: BUDGET_MIN, WORKERS, DATASET_ROOT (.carry/busi, else datasets/busi), WORK_DIR, RESULTS,
# RESULT_NAME, PY, PEER=off (usdet alone), PEER_VENV, PEER_WHEELS, SMOKE=1 (same as --smoke).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
SMOKE=${SMOKE:-}
for a in "$@"; do
  case "$a" in
    --smoke) SMOKE=1 ;;
    *) echo "gpu_busi.sh: unknown argument '$a' (only --smoke)" >&2; exit 2 ;;
  esac
done
log() { echo "[$(date +%H:%M:%S)] gpu_busi: $*"; }
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
GPU_CFG=configs/BUSI/recipe_scratch_gpu.yaml
if [ -z "${DATASET_ROOT:-}" ]; then
  if [ -f .carry/busi/annotations/test.json ]; then DATASET_ROOT=.carry/busi; else DATASET_ROOT=datasets/busi; fi
fi
if [ ! -f "$DATASET_ROOT/annotations/test.json" ]; then
  echo "gpu_busi.sh: no converted BUSI at $DATASET_ROOT (annotations/test.json): run" \
       "bash benchmarks/prepare_gpu_carry.sh, or tools/convert_to_coco.py busi, or set DATASET_ROOT" >&2
  exit 2
fi

# detectron2 and its pure-Python dependencies travel as wheels (prepare_gpu_carry.sh)
if ! $PY -c "import detectron2" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/whl/*.whl \
    || { echo "gpu_busi.sh: detectron2 is not importable and .carry/whl/ did not install" >&2; exit 2; }
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}

DEVICE=cuda
CONTEST=(--bootstrap 2000)
OVERRIDES=()
if [ -n "$SMOKE" ]; then
  # The same code paths on CPU: 8 images per split, a 64-px input, 6 iterations, results under
  # output/ (never benchmarks/results/). The 3-min budget is what a busy 2-core machine needs to
  # start the processes; usdet stops after its 6 iterations, the peer trains for the whole budget.
  DEVICE=cpu; WORKERS=0; BUDGET_MIN=${BUDGET_MIN:-3}
  RESULT_NAME=${RESULT_NAME:-gpu_contest_smoke}; WORK_DIR=${WORK_DIR:-output/gpu_busi_smoke}
  RESULTS=${RESULTS:-$WORK_DIR/results}
  CONTEST=(--bootstrap 50 --max-images 8 --max-iter 6 --imgsz 64 --batch 4)
  OVERRIDES=(SOLVER.AMP.ENABLED False SOLVER.IMS_PER_BATCH 2 SOLVER.WARMUP_ITERS 2
             INPUT.MIN_SIZE_TRAIN "(64,)" INPUT.MAX_SIZE_TRAIN 96 INPUT.MIN_SIZE_TEST 64 INPUT.MAX_SIZE_TEST 96)
elif ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_busi.sh: no CUDA device visible (for the CPU path of this script: --smoke)" >&2
  exit 2
fi
BUDGET_MIN=${BUDGET_MIN:-3}
WORKERS=${WORKERS:-12}
RESULT_NAME=${RESULT_NAME:-gpu_contest}
WORK_DIR=${WORK_DIR:-output/gpu_busi}
RESULTS=${RESULTS:-benchmarks/results}
mkdir -p "$WORK_DIR" "$RESULTS"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || log "no GPU visible (smoke run on CPU)"

# --- the peer's environment, made before any training so that a missing peer fails fast ---------
PEER_VENV=${PEER_VENV:-benchmarks/.venv-peer}
PEER_WHEELS=${PEER_WHEELS:-.carry/peer_whl}
PEER_ARGS=(--peer-venv "$PEER_VENV")
if [ "${PEER:-on}" = off ]; then
  PEER_ARGS=(--without-peer "PEER=off: usdet alone by request")
elif [ -f "$PEER_VENV/.peer-ready" ]; then
  :
elif compgen -G "$PEER_WHEELS/ultralytics-*.whl" > /dev/null; then
  PEER_ARGS+=(--peer-wheels "$PEER_WHEELS")
elif [ -n "$SMOKE" ]; then
  PEER_ARGS=(--without-peer "no peer venv at $PEER_VENV (benchmarks/peer_yolo.py makes it from PyPI on first use) and no wheels in $PEER_WHEELS (benchmarks/prepare_gpu_carry.sh): a smoke run installs nothing")
fi
if [ "${PEER_ARGS[0]}" = --peer-venv ]; then
  log "preparing the peer's venv ($PEER_VENV)"
  $PY - "$PEER_VENV" "${PEER_ARGS[3]:-}" <<'PYEOF' || { echo "gpu_busi.sh: the peer's venv could not be made" >&2; exit 2; }
import sys
sys.path.insert(0, "benchmarks")
import peer_yolo
print("peer python:", peer_yolo.peer_python(sys.argv[1], wheels=sys.argv[2] or None))
PYEOF
else
  log "peer skipped: ${PEER_ARGS[1]}"
fi

# --- the contest ---------------------------------------------------------------------------------
log "contest: $GPU_CFG vs YOLOv8n, ${BUDGET_MIN} min each on $DEVICE, $WORKERS loader workers, data $DATASET_ROOT"
$PY benchmarks/contest.py --config "$GPU_CFG" --dataset-root "$DATASET_ROOT" --budget-min "$BUDGET_MIN" \
  --device "$DEVICE" --workers "$WORKERS" --output "$WORK_DIR" --results "$RESULTS" --result-name "$RESULT_NAME" \
  "${CONTEST[@]}" "${PEER_ARGS[@]}" "${OVERRIDES[@]}" 2>&1 | tee "$WORK_DIR/contest.log"
RC=${PIPESTATUS[0]}
log "contest exited $RC; results: $RESULTS/$RESULT_NAME.json and $RESULTS/$RESULT_NAME/, logs in $WORK_DIR"

# --- what comes back from the device machine ($OUT: at most 8 files) ------------------------------
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
  cp "$RESULTS/$RESULT_NAME.json" "$OUT/" 2>/dev/null
  for f in "$RESULTS/$RESULT_NAME"/*.json; do [ -f "$f" ] && cp "$f" "$OUT/${RESULT_NAME}_$(basename "$f")"; done
  (cd "$WORK_DIR" && tar czf "$OUT/${RESULT_NAME}_logs.tgz" --exclude='*.pth' --exclude='events.out.*' \
     ./*.log ./*.txt ./*_report ./usdet_train/config.yaml ./usdet_train/metrics.json 2>/dev/null)
  log "copied the results and logs to $OUT"
fi
exit "$RC"
