"""COCO box AP through a maintained evaluator, keyed exactly as detectron2's ``COCOEvaluator``.

detectron2 v0.6 here has no compiled ``_C`` (its fast evaluator is unavailable), so the C++
``faster-coco-eval`` is used, falling back to ``pycocotools``. The key names and the per-class
``AP-<class>`` entries follow ``COCOEvaluator._derive_coco_results`` so that offline reports and
training-time evaluations read the same.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from .inputs import PredictionArrays, gc_paused

PredsLike = Union[Sequence[Dict[str, Any]], PredictionArrays]

logger = logging.getLogger(__name__)

__all__ = ["COCO_METRICS", "coco_bbox_metrics", "class_agnostic", "coco_bbox_metrics_and_agnostic"]

#: From this many detections on, the class-agnostic run goes to a forked process beside the
#: per-class one (two COCO evaluations of a million detections take tens of seconds each).
PARALLEL_MIN_DETECTIONS = 100_000

COCO_METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


def class_agnostic(gt: Dict[str, Any], preds: PredsLike, name: str = "lesion"):
    """Copies of ``gt`` and ``preds`` with every category merged into one (id 1, ``name``)."""
    gt2 = dict(gt)
    gt2["categories"] = [{"id": 1, "name": name}]
    gt2["annotations"] = [dict(a, category_id=1) for a in gt["annotations"]]
    if isinstance(preds, PredictionArrays):
        preds2 = dataclasses.replace(preds, category_ids=np.ones_like(preds.category_ids))
    else:
        preds2 = [dict(p, category_id=1) for p in preds]
    return gt2, preds2


def _fresh(gt: Dict[str, Any], preds: PredsLike, copy_preds: bool = True):
    """Copies the COCO API may add keys to (cheaper than a deep copy of a million detections)."""
    gt = dict(gt)
    gt["images"] = [dict(im) for im in gt["images"]]
    gt["annotations"] = [dict(a) for a in gt["annotations"]]
    gt["categories"] = [dict(c) for c in gt["categories"]]
    if isinstance(preds, PredictionArrays):
        return gt, preds.to_coco()
    if copy_preds:
        preds = [dict(p) for p in preds]
    # loadRes builds a polygon per detection unless one is present; box AP never reads it.
    no_polygon: List[Any] = []
    for p in preds:
        if "segmentation" not in p:
            p["segmentation"] = no_polygon
    return gt, list(preds)


def _run_cocoeval(gt: Dict[str, Any], preds: PredsLike, backend: str, copy_preds: bool = True):
    gt, preds = _fresh(gt, preds, copy_preds)
    with gc_paused():
        return _evaluate(gt, preds, backend)


def _evaluate(gt: Dict[str, Any], preds: List[Dict[str, Any]], backend: str):
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster

        coco_gt = COCO(gt)
        coco_dt = coco_gt.loadRes(preds)
        ev = COCOeval_faster(coco_gt, coco_dt, "bbox", print_function=logger.debug)
        ev.evaluate()
        ev.accumulate()
        with contextlib.redirect_stdout(io.StringIO()):
            ev.summarize()
        return ev
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(preds)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def _default_backend() -> str:
    try:
        import faster_coco_eval  # noqa: F401

        return "faster_coco_eval"
    except ImportError:  # pragma: no cover
        return "pycocotools"


def coco_bbox_metrics(
    gt: Dict[str, Any],
    preds: PredsLike,
    backend: Optional[str] = None,
    copy_preds: bool = True,
) -> Dict[str, Any]:
    """COCO bbox metrics (percent) and PR curves.

    Returns ``{"metrics": {"AP", "AP50", "AP75", "APs", "APm", "APl", "AP-<class>"...},
    "pr_curves": {<class>: {"recall": [...], "precision_50": [...], "precision_75": [...]}}}``;
    NaN where a value is undefined (no predictions, or no truth of a class). With
    ``copy_preds=False`` a list of result dicts is handed to the COCO API as is (it adds keys).
    """
    backend = backend or _default_backend()
    cats = sorted(gt["categories"], key=lambda c: c["id"])
    names = [str(c.get("name", c["id"])) for c in cats]
    if len(preds) == 0:
        logger.warning("No predictions: COCO AP is NaN")
        metrics = {m: float("nan") for m in COCO_METRICS}
        for n in names:
            metrics[f"AP-{n}"] = float("nan")
        return {"metrics": metrics, "pr_curves": {}}
    ev = _run_cocoeval(gt, preds, backend, copy_preds)
    stats = np.asarray(ev.stats, dtype=np.float64)
    metrics: Dict[str, float] = {
        m: float(stats[i] * 100) if stats[i] >= 0 else float("nan") for i, m in enumerate(COCO_METRICS)
    }
    precisions = np.asarray(ev.eval["precision"])  # (T IoU, R recall, K class, A area, M maxdets)
    cat_ids = list(ev.params.catIds)
    rec_thrs = np.asarray(ev.params.recThrs)
    iou_thrs = np.asarray(ev.params.iouThrs)
    i50 = int(np.argmin(np.abs(iou_thrs - 0.5)))
    i75 = int(np.argmin(np.abs(iou_thrs - 0.75)))
    pr_curves: Dict[str, Dict[str, List[float]]] = {}
    for c, name in zip(cats, names):
        if c["id"] not in cat_ids:
            metrics[f"AP-{name}"] = float("nan")
            continue
        k = cat_ids.index(c["id"])
        p = precisions[:, :, k, 0, -1]
        p = p[p > -1]
        metrics[f"AP-{name}"] = float(np.mean(p) * 100) if p.size else float("nan")
        p50 = precisions[i50, :, k, 0, -1]
        p75 = precisions[i75, :, k, 0, -1]
        if np.any(p50 > -1):
            pr_curves[name] = {
                "recall": rec_thrs.tolist(),
                "precision_50": np.where(p50 > -1, p50, np.nan).tolist(),
                "precision_75": np.where(p75 > -1, p75, np.nan).tolist(),
            }
    return {"metrics": metrics, "pr_curves": pr_curves}


def coco_bbox_metrics_and_agnostic(
    gt: Dict[str, Any],
    preds: List[Dict[str, Any]],
    backend: Optional[str] = None,
    parallel: Optional[bool] = None,
):
    """Per-class COCO metrics and, with more than one class, class-agnostic ones (``lesion``).

    ``preds`` (COCO result dicts) is handed to the COCO API as is and modified. Large inputs
    (``PARALLEL_MIN_DETECTIONS``) run the class-agnostic evaluation in a forked child beside the
    per-class one. Returns ``(per_class, agnostic_or_None)``.
    """
    from .parallel import Beside

    if len(gt["categories"]) < 2:
        return coco_bbox_metrics(gt, preds, backend, copy_preds=False), None
    gt_a = class_agnostic(gt, [])[0]

    def agnostic():
        for p in preds:
            p["category_id"] = 1
        return coco_bbox_metrics(gt_a, preds, backend, copy_preds=False)

    if parallel is None:
        parallel = len(preds) >= PARALLEL_MIN_DETECTIONS
    side = Beside(agnostic, enabled=parallel)
    if side.forked:  # the child has its own copy of ``preds``
        return coco_bbox_metrics(gt, preds, backend, copy_preds=False), side.result()
    per_class = coco_bbox_metrics(gt, preds, backend, copy_preds=False)
    return per_class, agnostic()  # after: it relabels ``preds``
