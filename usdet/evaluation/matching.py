"""Box geometry, the one greedy matcher, and the one ignore-region rule of every usdet score.

Penalized IoU, the ignore-region rule and the overlays all need "match detections to truth boxes
greedily in score order, each truth box used once"; this module is the only implementation, on
flat arrays (one row per box, an image index per row), vectorized across images.

Ignore regions (COCO ``iscrowd: 1``, e.g. BrEaST's "other suspicious lesion" masks) follow COCO's
crowd rule, applied once before any usdet score: a detection that matches no truth box (greedy,
IoU >= 0.5) and whose intersection with an ignore region of its image covers at least half of
the detection's own area is removed. Ignore regions are never lesions. COCO AP applies the same
rule itself (pycocotools' crowd matching), per IoU threshold.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

__all__ = [
    "IGNORE_MATCH_IOU",
    "IGNORE_MIN_COVER",
    "GreedyMatches",
    "box_iou_xywh",
    "box_iou_xyxy",
    "box_cover_xywh",
    "image_pairs",
    "top_k_candidates",
    "greedy_match",
    "in_ignore_region",
]

#: A detection "matches a truth box" for the ignore rule at this IoU (COCO's AP50 criterion).
IGNORE_MATCH_IOU = 0.5
#: Share of a detection's area an ignore region must cover for the detection to be removed.
IGNORE_MIN_COVER = 0.5


def _intersection_xywh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    iw = np.minimum(a[..., 0] + a[..., 2], b[..., 0] + b[..., 2]) - np.maximum(a[..., 0], b[..., 0])
    ih = np.minimum(a[..., 1] + a[..., 3], b[..., 1] + b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
    return np.clip(iw, 0, None) * np.clip(ih, 0, None)


def box_iou_xywh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Continuous IoU of ``[x, y, w, h]`` boxes, elementwise with broadcasting (pycocotools' rule, no +1)."""
    inter = _intersection_xywh(a, b)
    union = a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def box_cover_xywh(a: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Share of each box ``a``'s own area inside ``region`` (pycocotools' crowd IoU); 0 for an empty box."""
    inter = _intersection_xywh(a, region)
    area = a[..., 2] * a[..., 3]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(area > 0, inter / np.where(area > 0, area, 1.0), 0.0)


def image_pairs(a_image: np.ndarray, b_image: np.ndarray, num_images: int) -> Tuple[np.ndarray, np.ndarray]:
    """All ``(i, j)`` with ``a_image[i] == b_image[j]``; ``b`` must be grouped by image (sorted)."""
    b_count = np.bincount(b_image, minlength=num_images)
    b_start = np.r_[0, np.cumsum(b_count)[:-1]]
    per_a = b_count[a_image]
    i = np.repeat(np.arange(len(a_image)), per_a)
    offs = np.arange(len(i)) - np.repeat(np.cumsum(per_a) - per_a, per_a)
    j = b_start[a_image][i] + offs
    return i, j


def top_k_candidates(pred_image: np.ndarray, pred_scores: np.ndarray, topk: Optional[int]) -> np.ndarray:
    """Indices of each image's ``topk`` (all with None) highest-scoring predictions, grouped by image, best first."""
    if len(pred_scores) == 0:
        return np.zeros(0, dtype=np.int64)
    # lexsort is stable: equal scores keep the input order.
    order = np.lexsort((-pred_scores, pred_image))
    if topk is None:
        return order
    img = pred_image[order]
    starts = np.flatnonzero(np.r_[True, img[1:] != img[:-1]])
    rank = np.arange(len(img)) - np.repeat(starts, np.diff(np.r_[starts, len(img)]))
    return order[rank < topk]


@dataclass
class GreedyMatches:
    """One row per candidate prediction (grouped by image, best first)."""

    cand: np.ndarray  # (C,) index into the predictions
    gt_index: np.ndarray  # (C,) matched truth index, -1 where unmatched
    iou: np.ndarray  # (C,) IoU of the match (0 where unmatched)

    @property
    def matched(self) -> np.ndarray:
        return self.gt_index >= 0


def greedy_match(
    pred_image: np.ndarray,
    pred_scores: np.ndarray,
    pred_boxes: np.ndarray,
    gt_image: np.ndarray,
    gt_boxes: np.ndarray,
    num_images: int,
    iou_thresh: float,
    topk: Optional[int] = None,
    pred_classes: Optional[np.ndarray] = None,
    gt_classes: Optional[np.ndarray] = None,
) -> GreedyMatches:
    """Greedy score-order matching, each truth box used once (COCO's rule).

    Each image's ``topk`` best predictions (all with None), highest score first, take the
    still-unmatched truth box of highest IoU (ties: first in input order) if that IoU >=
    ``iou_thresh``. Truth boxes must be grouped by image (input order kept within an image).
    With ``pred_classes``/``gt_classes`` a prediction only matches a truth box of its class.
    Runs rank by rank, vectorized across images.
    """
    cand = top_k_candidates(pred_image, pred_scores, topk)
    c_img = pred_image[cand]
    iou_out = np.zeros(len(cand), dtype=np.float64)
    gt_out = np.full(len(cand), -1, dtype=np.int64)
    gt_per_image = np.bincount(gt_image, minlength=num_images)
    max_gt = int(gt_per_image.max()) if num_images and len(gt_image) else 0
    if len(cand) and max_gt:
        # Padded (image, slot) table of truth indices in input order; -1 = no box.
        gt_start = np.r_[0, np.cumsum(gt_per_image)[:-1]]
        slot = np.arange(len(gt_image)) - gt_start[gt_image]
        table = np.full((num_images, max_gt), -1, dtype=np.int64)
        table[gt_image, slot] = np.arange(len(gt_image))
        taken = np.zeros((num_images, max_gt), dtype=bool)
        starts = np.flatnonzero(np.r_[True, c_img[1:] != c_img[:-1]])
        rank = np.arange(len(cand)) - np.repeat(starts, np.diff(np.r_[starts, len(cand)]))
        for r in range(int(rank.max()) + 1):
            rows = np.flatnonzero(rank == r)
            imgs = c_img[rows]
            gidx = table[imgs]  # (R, M)
            valid = (gidx >= 0) & ~taken[imgs]
            if pred_classes is not None and gt_classes is not None:
                valid &= gt_classes[np.maximum(gidx, 0)] == pred_classes[cand[rows], None]
            ious = box_iou_xywh(pred_boxes[cand[rows], None, :], gt_boxes[np.maximum(gidx, 0)])
            ious = np.where(valid, ious, -1.0)
            best = np.argmax(ious, axis=1)  # first maximum = first in input order
            best_iou = ious[np.arange(len(rows)), best]
            ok = (best_iou >= 0) & (best_iou >= iou_thresh)
            iou_out[rows[ok]] = best_iou[ok]
            gt_out[rows[ok]] = gidx[np.flatnonzero(ok), best[ok]]
            taken[imgs[ok], best[ok]] = True
    return GreedyMatches(cand=cand, gt_index=gt_out, iou=iou_out)


def in_ignore_region(
    pred_image: np.ndarray,
    pred_scores: np.ndarray,
    pred_boxes: np.ndarray,
    gt_image: np.ndarray,
    gt_boxes: np.ndarray,
    ignore_image: np.ndarray,
    ignore_boxes: np.ndarray,
    num_images: int,
) -> np.ndarray:
    """Mask of the detections the ignore-region rule removes (see the module docstring)."""
    out = np.zeros(len(pred_scores), dtype=bool)
    if not len(ignore_image) or not len(pred_scores):
        return out
    m = greedy_match(pred_image, pred_scores, pred_boxes, gt_image, gt_boxes, num_images, IGNORE_MATCH_IOU)
    unmatched = np.ones(len(pred_scores), dtype=bool)
    unmatched[m.cand[m.matched]] = False
    order = np.argsort(ignore_image, kind="stable")
    i, j = image_pairs(pred_image, ignore_image[order], num_images)
    covered = box_cover_xywh(pred_boxes[i], ignore_boxes[order][j]) >= IGNORE_MIN_COVER
    out[i[covered]] = True
    return out & unmatched


def box_iou_xyxy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes ``a`` (N,4) and ``b`` (M,4), xyxy."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(axis=1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
