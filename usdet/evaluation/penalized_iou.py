"""Penalized IoU: the study's model-selection score, computed over the whole evaluation set.

Definition (score threshold ``s``, IoU threshold ``t``, top-k ``k``):

* per image keep the predictions with score >= s, highest first, at most k;
* match greedily in score order: each kept prediction takes the still-unmatched truth box of
  highest IoU (ties: first in annotation order) if that IoU >= t. A match is a TP and adds its
  IoU; an unmatched prediction is an FP, an unmatched truth box an FN (each adds 0); an image
  with no truth and no kept prediction is a TN and is left out;
* ``score = sum(IoU of TPs) / (TP + FP + FN)``, NaN when the denominator is 0.

With ``t = 0`` every kept prediction that finds an unmatched truth box is a TP, even at IoU 0
(it then adds 0 to the sum but only 1 to the denominator), which is the original study's rule.
With ``t > 0`` a prediction below ``t`` is an FP *and* its truth box stays an FN.

``class_aware=True`` (benign/malignant): the kept set is the same top-k per image, but a
prediction can only match a truth box of its own class.

Why it is fast: greedy matching in score order means the matches of the predictions above a
threshold do not depend on the predictions below it, so matching the top-k of every image once
(threshold-free) gives the result at *every* score threshold by prefix sums. The sweep over
``s = 0.05 .. 0.95`` therefore costs one sort. Matching itself runs rank by rank, vectorized
across all images.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Sequence

import numpy as np

from .inputs import DetectionData, build_detection_data
from .matching import greedy_match

logger = logging.getLogger(__name__)

__all__ = [
    "SWEEP_THRESHOLDS",
    "PiouMatches",
    "match_penalized_iou",
    "penalized_iou",
    "penalized_iou_from_matches",
    "per_image_piou_stats",
]

#: Score thresholds of the sweep that gives ``best_score`` / ``best_score_thresh``.
SWEEP_THRESHOLDS = np.round(np.arange(1, 20) * 0.05, 2)


@dataclass
class PiouMatches:
    """Threshold-free matching of the top-k predictions of every image (one row per kept candidate)."""

    image: np.ndarray  # (C,) image index
    score: np.ndarray  # (C,) score
    iou: np.ndarray  # (C,) IoU of the match (0 where unmatched)
    matched: np.ndarray  # (C,) bool, TP when kept
    num_images: int
    num_gt: int
    gt_per_image: np.ndarray  # (N,) truth boxes per image
    iou_thresh: float
    topk: int
    class_aware: bool


def match_penalized_iou(
    data: DetectionData, iou_thresh: float = 0.0, topk: int = 1, class_aware: bool = False
) -> PiouMatches:
    """Greedy score-order matching of each image's top-k predictions to its truth boxes."""
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    n = data.num_images
    gm = greedy_match(
        data.pred_image,
        data.pred_scores,
        data.pred_boxes,
        data.gt_image,
        data.gt_boxes,
        n,
        iou_thresh,
        topk,
        pred_classes=data.pred_classes if class_aware else None,
        gt_classes=data.gt_classes if class_aware else None,
    )
    return PiouMatches(
        image=data.pred_image[gm.cand],
        score=data.pred_scores[gm.cand],
        iou=gm.iou,
        matched=gm.matched,
        num_images=n,
        num_gt=int(len(data.gt_image)),
        gt_per_image=np.bincount(data.gt_image, minlength=n),
        iou_thresh=float(iou_thresh),
        topk=int(topk),
        class_aware=bool(class_aware),
    )


def _counts_at(m: PiouMatches, thresholds: np.ndarray) -> Dict[str, np.ndarray]:
    """TP/FP/FN/TN and IoU sums at each score threshold, by prefix sums over sorted scores."""
    thresholds = np.asarray(thresholds, dtype=np.float64)
    order = np.argsort(-m.score, kind="stable")
    s = m.score[order]
    cum_kept = np.r_[0, np.arange(1, len(s) + 1)]
    cum_tp = np.r_[0, np.cumsum(m.matched[order])]
    cum_iou = np.r_[0.0, np.cumsum(np.where(m.matched[order], m.iou[order], 0.0))]
    # number of candidates with score >= thr: s is descending
    k = np.searchsorted(-s, -thresholds, side="right")
    tp = cum_tp[k]
    fp = cum_kept[k] - tp
    fn = m.num_gt - tp
    # TN: images without truth whose best candidate is below the threshold (or that have none).
    top = np.full(m.num_images, -np.inf)
    if len(m.score):
        np.maximum.at(top, m.image, m.score)
    neg_top = np.sort(top[m.gt_per_image == 0])
    tn = np.searchsorted(neg_top, thresholds, side="left")
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "sum_iou": cum_iou[k]}


def _score(sum_iou: np.ndarray, tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    den = (tp + fp + fn).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, sum_iou / np.where(den > 0, den, 1.0), np.nan)


def penalized_iou_from_matches(
    m: PiouMatches, score_thresh: float = 0.45, sweep: Sequence[float] = SWEEP_THRESHOLDS
) -> "OrderedDict[str, Any]":
    """The ``piou`` result dict at ``score_thresh`` plus the best score over ``sweep``."""
    thr = np.r_[float(score_thresh), np.asarray(sweep, dtype=np.float64)]
    c = _counts_at(m, thr)
    scores = _score(c["sum_iou"], c["tp"], c["fp"], c["fn"])
    sweep_scores = scores[1:]
    if np.all(np.isnan(sweep_scores)):
        best, best_thr = float("nan"), None
    else:
        i = int(np.nanargmax(sweep_scores))
        best, best_thr = float(sweep_scores[i]), float(thr[1 + i])
    tp = int(c["tp"][0])
    out: "OrderedDict[str, Any]" = OrderedDict()
    out["score"] = float(scores[0])
    out["tp"] = tp
    out["fp"] = int(c["fp"][0])
    out["fn"] = int(c["fn"][0])
    out["tn"] = int(c["tn"][0])
    out["mean_iou_tp"] = float(c["sum_iou"][0] / tp) if tp else float("nan")
    out["score_thresh"] = float(score_thresh)
    out["iou_thresh"] = m.iou_thresh
    out["topk"] = m.topk
    out["class_aware"] = m.class_aware
    out["best_score"] = best
    out["best_score_thresh"] = best_thr
    out["sweep"] = {
        "score_thresh": [float(x) for x in thr[1:]],
        "score": [float(x) for x in sweep_scores],
        "tp": [int(x) for x in c["tp"][1:]],
        "fp": [int(x) for x in c["fp"][1:]],
        "fn": [int(x) for x in c["fn"][1:]],
        "tn": [int(x) for x in c["tn"][1:]],
    }
    return out


def per_image_piou_stats(m: PiouMatches, score_thresh: float) -> Dict[str, np.ndarray]:
    """Per-image sum of TP IoU, TP, FP, FN at ``score_thresh`` (sufficient statistics for bootstrap)."""
    kept = m.score >= score_thresh
    n = m.num_images
    tp_mask = kept & m.matched
    tp = np.bincount(m.image[tp_mask], minlength=n).astype(np.float64)
    fp = np.bincount(m.image[kept & ~m.matched], minlength=n).astype(np.float64)
    fn = m.gt_per_image.astype(np.float64) - tp
    sum_iou = np.bincount(m.image[tp_mask], weights=m.iou[tp_mask], minlength=n)
    return {"sum_iou": sum_iou, "tp": tp, "fp": fp, "fn": fn}


def penalized_iou(
    gts: Any,
    preds: Sequence[Mapping[str, Any]] = (),
    score_thresh: float = 0.45,
    iou_thresh: float = 0.0,
    topk: int = 1,
    class_aware: bool = False,
) -> "OrderedDict[str, Any]":
    """Penalized IoU over a whole evaluation set.

    Args:
        gts: a COCO ground-truth dict, ``{image_id: [{"bbox": xywh, "category_id": c}, ...]}``
            (every key is an evaluated image, lesion-free ones with an empty list), or a
            :class:`DetectionData` (then ``preds`` is ignored).
        preds: COCO results ``{image_id, category_id, bbox (xywh), score}``.

    Returns:
        ``score, tp, fp, fn, tn, mean_iou_tp, score_thresh, iou_thresh, topk, class_aware,
        best_score, best_score_thresh, sweep`` (NaN where undefined).
    """
    data = gts if isinstance(gts, DetectionData) else build_detection_data(gts, preds)
    m = match_penalized_iou(data, iou_thresh=iou_thresh, topk=topk, class_aware=class_aware)
    return penalized_iou_from_matches(m, score_thresh)

