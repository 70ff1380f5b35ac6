"""Detection metrics as functions of per-image weights, for subgroup CIs and paired comparisons.

Each metric of :mod:`usdet.evaluation.bootstrap` is reduced once to per-image sufficient
statistics, so a weight vector over the images (1 = the full set, bootstrap multiplicities =
one resample) gives the metric by a matrix product. Here they are exposed by name so that a
subgroup table (:mod:`.subgroups`) and a paired comparison of two models (:mod:`.compare`,
the same resampled images for both) share one computation with the report's CIs.

With all weights 1 the values equal the full-set metrics: COCO's AP50 and AP (0.50:0.95,
101-point interpolation, 100 detections per image and class, truth boxes only, crowd regions
left out as in :func:`usdet.evaluation.inputs.build_detection_data`), penalized IoU, CPM,
FROC sensitivity at 0.5 and 1 FP/image, and the image-level ROC AUC.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable

import numpy as np

# the resampling loop and the interval rule are the report's own (bootstrap.py), offered here with the metrics
from .bootstrap import _Ap50Stat, _AucStat, _CpmStat, _PiouStat, percentile_ci, resampled_values
from .classification import top_score_per_image
from .inputs import DetectionData
from .penalized_iou import match_penalized_iou

__all__ = ["METRICS", "COCO_IOU_THRS", "metric_functions", "subset", "full_values", "resampled_values", "percentile_ci"]

#: Metric names in table order (``sens@0.5``/``sens@1``: FROC sensitivity at 0.5 / 1 FP per image).
METRICS = ("AP50", "AP", "piou", "cpm", "sens@0.5", "sens@1", "image_auc")
COCO_IOU_THRS = np.linspace(0.5, 0.95, 10)  # COCOeval's iouThrs

WeightFn = Callable[[np.ndarray], np.ndarray]


class _ApStat:
    """COCO AP (IoU 0.50:0.95) in percent: the mean of the per-threshold AP over ten thresholds."""

    def __init__(self, data: DetectionData):
        self.parts = [_Ap50Stat(data, t) for t in COCO_IOU_THRS]
        self.size = max(p.size for p in self.parts)

    def __call__(self, wt: np.ndarray) -> np.ndarray:
        return np.mean(np.stack([p(wt) for p in self.parts]), axis=0)


def metric_functions(
    data: DetectionData,
    names: Iterable[str] = METRICS,
    *,
    piou_score_thresh: float = 0.45,
    piou_iou_thresh: float = 0.0,
    piou_topk: int = 1,
    piou_class_aware: bool = False,
    froc_hit: str = "iou",
    froc_iou: float = 0.5,
) -> Dict[str, WeightFn]:
    """``{name: f}`` where ``f(wt)`` maps per-image weights (N, B) to B metric values (NaN if undefined)."""
    out: Dict[str, WeightFn] = {}
    for name in names:
        if name == "AP50":
            out[name] = _Ap50Stat(data)
        elif name == "AP":
            out[name] = _ApStat(data)
        elif name == "piou":
            m = match_penalized_iou(data, piou_iou_thresh, piou_topk, piou_class_aware)
            out[name] = _PiouStat(m, piou_score_thresh)
        elif name == "cpm":
            out[name] = _CpmStat(data, froc_hit, froc_iou)
        elif name.startswith("sens@"):
            out[name] = _CpmStat(data, froc_hit, froc_iou, rates=(float(name[5:]),))
        elif name == "image_auc":
            has_lesion = data.gt_count_per_image() > 0
            out[name] = _AucStat(has_lesion, top_score_per_image(data), np.ones(data.num_images, bool))
        else:
            raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
    return out


def subset(data: DetectionData, keep: np.ndarray) -> DetectionData:
    """The images where ``keep`` is true, with their truth and predictions (image order kept)."""
    keep = np.asarray(keep, dtype=bool)
    new_index = np.cumsum(keep) - 1
    g = keep[data.gt_image]
    p = keep[data.pred_image]
    return DetectionData(
        image_ids=data.image_ids[keep],
        gt_boxes=data.gt_boxes[g],
        gt_image=new_index[data.gt_image[g]],
        gt_classes=data.gt_classes[g],
        pred_boxes=data.pred_boxes[p],
        pred_image=new_index[data.pred_image[p]],
        pred_scores=data.pred_scores[p],
        pred_classes=data.pred_classes[p],
        categories=dict(data.categories),
    )


def full_values(funcs: Dict[str, WeightFn], n_images: int) -> Dict[str, float]:
    """Each metric on the full set (all weights 1)."""
    ones = np.ones((n_images, 1))
    return {k: float(f(ones)[0]) for k, f in funcs.items()}
