"""FROC: lesion sensitivity against false positives per image (LUNA16 convention).

AP mixes localisation and ranking across images; radiologists read detectors as "how many
lesions are found at a tolerable number of false alarms per image", which is FROC.

Rules: a prediction *hits* a truth box when IoU >= ``iou_thresh`` (``hit="iou"``) or when the
prediction's box centre lies inside the truth box (``hit="center"``). Each truth box counts
once: it is found at threshold ``tau`` when any prediction hitting it has score >= tau; further
hits on an already-found box are neither TP nor FP; a prediction hitting no truth box is an FP.
Classes are ignored (lesion detection). Sensitivity at a rate is the highest reached at an
average FP/image not above that rate; CPM is the mean over 1/8, 1/4, 1/2, 1, 2, 4, 8.

Rates beyond the curve (the usual convention, e.g. LUNA16's evaluation script): the curve ends at
the FP/image of the lowest-scoring detection, where the detector has no more boxes to give; at a
higher rate the sensitivity stays at the curve's last value. So every model has a CPM, a
conservative one included, and two models can be compared. Such rates are *extended*: listed in
``extended_rates`` (flagged in report.md, the FROC plot and compare_models' output), since
lower-scoring detections the model did not output might have found more lesions; a curve that
has found every lesion extends nothing (sensitivity 1 cannot rise). To reach high rates with
real detections, keep more low-score ones (``MODEL.ROI_HEADS.SCORE_THRESH_TEST``,
``TEST.DETECTIONS_PER_IMAGE``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Sequence, Tuple

import numpy as np

from .inputs import DetectionData
from .matching import box_iou_xywh, image_pairs

__all__ = ["FROC_RATES", "FrocHits", "froc_hits", "froc_curve", "sensitivity_at_rates", "rates_extended", "froc"]

FROC_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass
class FrocHits:
    """Per-truth detection score and per-FP score: all FROC needs, at every threshold."""

    truth_score: np.ndarray  # (G,) best score of a prediction hitting the box; -inf if none
    truth_image: np.ndarray  # (G,)
    fp_score: np.ndarray  # (F,) scores of predictions that hit nothing
    fp_image: np.ndarray  # (F,)
    num_images: int
    hit: str
    iou_thresh: float


def froc_hits(data: DetectionData, hit: str = "iou", iou_thresh: float = 0.5) -> FrocHits:
    """Decide which predictions hit which truth boxes (all predictions, any class)."""
    if hit not in ("iou", "center"):
        raise ValueError(f"FROC hit rule must be 'iou' or 'center', got {hit!r}")
    p_idx, g_idx = image_pairs(data.pred_image, data.gt_image, data.num_images)
    pb = data.pred_boxes[p_idx]
    gb = data.gt_boxes[g_idx]
    if hit == "iou":
        is_hit = box_iou_xywh(pb, gb) >= iou_thresh
    else:
        cx = pb[:, 0] + pb[:, 2] / 2
        cy = pb[:, 1] + pb[:, 3] / 2
        is_hit = (cx >= gb[:, 0]) & (cx <= gb[:, 0] + gb[:, 2]) & (cy >= gb[:, 1]) & (cy <= gb[:, 1] + gb[:, 3])
    hits_any = np.bincount(p_idx[is_hit], minlength=len(data.pred_scores)) > 0
    truth_score = np.full(len(data.gt_image), -np.inf)
    np.maximum.at(truth_score, g_idx[is_hit], data.pred_scores[p_idx[is_hit]])
    fp = ~hits_any
    return FrocHits(
        truth_score=truth_score,
        truth_image=data.gt_image.copy(),
        fp_score=data.pred_scores[fp],
        fp_image=data.pred_image[fp],
        num_images=data.num_images,
        hit=hit,
        iou_thresh=float(iou_thresh),
    )


def froc_curve(h: FrocHits) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FP per image, sensitivity, threshold) at every distinct score, starting at (0, 0, +inf)."""
    found = h.truth_score[np.isfinite(h.truth_score)]
    thr = np.unique(np.r_[found, h.fp_score])[::-1]
    fp_sorted = np.sort(h.fp_score)
    tr_sorted = np.sort(found)
    n_fp = len(fp_sorted) - np.searchsorted(fp_sorted, thr, side="left")
    n_tr = len(tr_sorted) - np.searchsorted(tr_sorted, thr, side="left")
    g = len(h.truth_score)
    fps = np.r_[0.0, n_fp / max(h.num_images, 1)]
    sens = np.r_[0.0, n_tr / g] if g else np.full(len(thr) + 1, np.nan)
    return fps, sens, np.r_[np.inf, thr]


def sensitivity_at_rates(fps: np.ndarray, sens: np.ndarray, rates: Sequence[float] = FROC_RATES) -> np.ndarray:
    """Highest sensitivity reached at an average FP/image not above each rate (curve is monotone);
    beyond the curve's end, its last value."""
    idx = np.searchsorted(fps, np.asarray(rates, dtype=np.float64), side="right") - 1
    return sens[np.maximum(idx, 0)]


def rates_extended(fps: np.ndarray, sens: np.ndarray, rates: Sequence[float] = FROC_RATES) -> np.ndarray:
    """Which rates lie beyond the curve's last FP/image while lesions are still missed (their
    sensitivity is the end value carried on, not one the detections reached)."""
    rates = np.asarray(rates, dtype=np.float64)
    all_found = bool(len(sens)) and np.isfinite(sens[-1]) and sens[-1] >= 1.0
    return (rates > fps[-1] + 1e-12) & (not all_found)


def froc(
    data: DetectionData, hit: str = "iou", iou_thresh: float = 0.5, rates: Sequence[float] = FROC_RATES
) -> Dict[str, Any]:
    """``{"hit", "iou_thresh", "fps_per_image", "sensitivity", "extended", "extended_rates", "cpm", ...}``.

    ``extended[i]``: rate ``i`` lies beyond the curve's end, its sensitivity carried from there
    (module docstring); ``cpm`` is NaN only without any lesion.
    """
    h = froc_hits(data, hit, iou_thresh)
    fps, sens, thr = froc_curve(h)
    at = sensitivity_at_rates(fps, sens, rates)
    no_lesion = len(h.truth_score) == 0
    extended = rates_extended(fps, sens, rates) & (not no_lesion)
    return {
        "hit": hit,
        "iou_thresh": float(iou_thresh) if hit == "iou" else None,
        "fps_per_image": [float(r) for r in rates],
        "sensitivity": [float(s) for s in at],
        "extended": [bool(e) for e in extended],
        "extended_rates": [float(r) for r, e in zip(rates, extended) if e],
        "max_fps_per_image": float(fps[-1]),
        "cpm": float("nan") if no_lesion else float(np.mean(at)),
        "num_lesions": int(len(h.truth_score)),
        "num_images": int(h.num_images),
        "curve": {"fps_per_image": fps.tolist(), "sensitivity": sens.tolist(), "score_thresh": thr.tolist()},
    }
