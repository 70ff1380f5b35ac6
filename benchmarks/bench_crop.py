#!/usr/bin/env python
"""Workspace cropping speed on 1024x768 synthetic scanner screens, one core.

Screens come from ``usdet.data.screens.make_screen`` (linear and sector probes, dark and grey
GUIs, dim frames, Doppler boxes, some JPEG-compressed), drawn once before timing. Measured in
one run, single-threaded (OpenCV and BLAS limited to one thread):

* ``usdet_fps``: ``usdet.data.crop.find_image_region`` frames per CPU-second of one core (target
  >= 50; CPU time, so other load on a shared machine does not count; ``*_fps_wall`` is wall time);
* ``views_fps``: ``usdet.data.views.find_views`` (what crop_workspace and predict run: the cropper
  plus the dual-view divider search) on the same frames; ``views_split`` is how often it split a
  single-image screen (should be 0), ``dual_views_iou90`` how often both views of drawn dual-view
  screens (a third as many) are found at IoU >= 0.9;
* ``naive_fps``: the original study's approach (gray row/column sums above a threshold, first
  and last rows/columns kept), the cheapest crop there is, for scale. Both also report how
  often their box matches the true image region (IoU >= 0.95), so speed is not bought by
  wrong crops.

  python benchmarks/bench_crop.py [--frames 60] [--repeat 3]
"""
import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_result  # noqa: E402

TARGET_FPS = 50.0
CANVAS = (1024, 768)  # W, H


def naive_crop(frame_rgb, thresh: float = 10.0):
    """Row/column-mean threshold crop (the original study's method); None when nothing passes."""
    import numpy as np

    gray = frame_rgb.mean(axis=2)
    rows = np.flatnonzero(gray.mean(axis=1) > thresh)
    cols = np.flatnonzero(gray.mean(axis=0) > thresh)
    if rows.size == 0 or cols.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--repeat", type=int, default=3, help="timed passes over the frames (best is kept)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import cv2
    import numpy as np

    from usdet.data.crop import find_image_region
    from usdet.data.screens import make_screen
    from usdet.data.views import find_views

    cv2.setNumThreads(1)
    rng = np.random.default_rng(args.seed)
    screens = [make_screen(rng, canvas=CANVAS) for _ in range(args.frames)]
    frames = [s.frame for s in screens]
    assert all(f.shape[:2] == (CANVAS[1], CANVAS[0]) for f in frames)

    def timed(fn):
        """Best wall and best CPU seconds over the passes (CPU time = work done on one core, which
        other processes sharing the machine do not inflate)."""
        wall, cpu, out = float("inf"), float("inf"), None
        for _ in range(args.repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            res = [fn(f) for f in frames]
            wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
            out = res
        return wall, cpu, out

    find_image_region(frames[0])  # lazy imports and OpenCV start-up outside the timing
    usdet_wall, usdet_s, results = timed(find_image_region)
    naive_wall, naive_s, naive_boxes = timed(naive_crop)
    views_wall, views_s, views = timed(find_views)
    duals = [make_screen(rng, canvas=CANVAS, dual="side" if i % 3 else "stacked", gain=float(rng.uniform(0.8, 1.2)))
             for i in range(max(1, args.frames // 3))]
    dual_good = 0
    for s in duals:
        found = find_views(s.frame)
        dual_good += len(found) == 2 and all(v.box is not None and iou(v.box, t) >= 0.9 for v, t in zip(found, s.views))

    usdet_boxes = [r.box for r in results]
    good = sum(1 for b, s in zip(usdet_boxes, screens) if b is not None and iou(b, s.box) >= 0.95)
    refused = sum(1 for b in usdet_boxes if b is None)
    naive_good = sum(1 for b, s in zip(naive_boxes, screens) if b is not None and iou(b, s.box) >= 0.95)
    usdet_fps = len(frames) / usdet_s  # frames per CPU-second of one core
    naive_fps = len(frames) / naive_s
    met = usdet_fps >= TARGET_FPS
    write_result("crop", {
        "frames": len(frames), "frame_size": f"{CANVAS[0]}x{CANVAS[1]}", "threads": 1,
        "usdet_fps": round(usdet_fps, 1), "usdet_ms_per_frame": round(1000 * usdet_s / len(frames), 2),
        "usdet_fps_wall": round(len(frames) / usdet_wall, 1), "naive_fps_wall": round(len(frames) / naive_wall, 1),
        "target_fps": TARGET_FPS,
        "usdet_crop_iou95": round(good / len(frames), 3), "usdet_refused": round(refused / len(frames), 3),
        "views_fps": round(len(frames) / views_s, 1), "views_fps_wall": round(len(frames) / views_wall, 1),
        "views_split": round(sum(len(v) > 1 for v in views) / len(frames), 3),
        "dual_views_iou90": round(dual_good / len(duals), 3), "dual_frames": len(duals),
        "naive_fps": round(naive_fps, 1), "naive_crop_iou95": round(naive_good / len(frames), 3),
        "ratio_usdet_vs_naive_time": round(usdet_s / naive_s, 2),
        "reference": "row/column-mean > 10 threshold crop (the original study's method)",
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "target_met": met,
    })
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
