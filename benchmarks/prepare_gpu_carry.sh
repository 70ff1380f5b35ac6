#!/usr/bin/env bash
# Prepare what benchmarks/gpu_busi.sh needs on the GPU machine (no registry reachable there):
#   .carry/whl/  pure-Python detectron2 (patched v0.6, see tools/install_detectron2.py) and the
#                wheels torch's image lacks, for CPython 3.12 / manylinux x86_64;
#   .carry/peer_whl/ the peer's wheels (benchmarks/peer_yolo.py OFFLINE_WHEELS: Ultralytics and
#                ultralytics-thop; the rest it needs is in the GPU machine's image, and polars, a
#                54 MB runtime, is left out: the peer's driver reads results.csv without it);
#   .carry/busi/ a compact BUSI copy converted by usdet (JPEG, long side <= MAX_SIZE).
# Everything comes from PyPI. The whole .carry/ must stay under the device's 64 MiB with the repo.
# .carry/ is git-ignored: nothing of BUSI is ever committed. Run here with the venv set up:
#   bash benchmarks/prepare_gpu_carry.sh [BUSI_ROOT]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
BUSI_ROOT=${1:-${USDET_BUSI_ROOT:-../shared/data/busi}}
MAX_SIZE=${MAX_SIZE:-512}
mkdir -p .carry/whl
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT \
  -d .carry/whl pycocotools==2.0.11 faster-coco-eval==1.8.0 iopath==0.1.9 yacs==0.1.8 termcolor==3.3.0 \
  omegaconf==2.3.0 hydra-core==1.3.8 2>&1 | grep -v "is ignored" || true
tmp=$(mktemp -d)
$PY -m pip download -q --no-deps --no-binary :all: -d "$tmp" fvcore==0.1.5.post20221221 antlr4-python3-runtime==4.9.3 2>&1 | grep -v "is ignored" || true
$PY -m pip wheel -q --no-deps -w .carry/whl "$tmp"/*.tar.gz 2>&1 | grep -v "is ignored" || true
$PY tools/install_detectron2.py --keep "$tmp/d2" --no-install > /dev/null
$PY -m pip wheel -q --no-deps --no-build-isolation -w .carry/whl "$tmp/d2" 2>&1 | grep -v "is ignored" || true
rm -rf "$tmp"
mkdir -p .carry/peer_whl
# shellcheck disable=SC2046
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT \
  -d .carry/peer_whl $($PY -c "import sys; sys.path.insert(0, 'benchmarks'); import peer_yolo; print(*peer_yolo.OFFLINE_WHEELS)") \
  2>&1 | grep -v "is ignored" || true
if [ ! -f .carry/busi/annotations/test.json ]; then
  $PY tools/convert_to_coco.py busi --root "$BUSI_ROOT" --output .carry/busi --image-format jpg \
    --max-size "$MAX_SIZE" --workers 2 --seed 0
fi
du -shc .carry/whl .carry/peer_whl .carry/busi  # with the repository: under the 64 MiB a device call carries
