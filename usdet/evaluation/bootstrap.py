"""Seeded bootstrap 95% confidence intervals, resampling images.

Re-running the evaluators 1000 times would take minutes on a large set. Instead each metric is
reduced once to per-image sufficient statistics, so that one resample (a vector of image
multiplicities ``w``) is a weighted sum, computed for a batch of resamples as a (sparse) matrix
product:

* penalized IoU: per-image sum of TP IoU, TP, FP, FN;
* AP50: COCO's per-class IoU-0.5 matching done once (flags of the top-100 detections per image
  and class); the weighted cumulative TP/FP counts at the true-positive ranks give the
  101-point interpolated AP exactly as COCO would on the resampled set;
* CPM: per-lesion detection score and FP scores, counted at the distinct lesion scores;
* ROC AUCs: weighted Mann-Whitney statistic over score levels.

Duplicated images in a resample act as tied copies. Detections inside ignore (crowd) regions are
already removed from :class:`DetectionData` (see :mod:`usdet.evaluation.ignore`).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import scipy.sparse as sp

from .classification import find_malignant_category, top_score_per_image
from .froc import FROC_RATES, froc_hits
from .inputs import DetectionData
from .penalized_iou import PiouMatches, match_penalized_iou, per_image_piou_stats

__all__ = ["bootstrap_metrics", "resample_weights", "resampled_values", "percentile_ci", "ap50_from_weights",
           "COCO_REC_THRS"]

COCO_REC_THRS = np.linspace(0.0, 1.0, 101)


def resample_weights(rng: np.random.Generator, n_images: int, n: int) -> np.ndarray:
    """(n_images, n) multiplicities of ``n`` bootstrap resamples of ``n_images`` images."""
    idx = rng.integers(0, n_images, size=(n, n_images))
    idx += (np.arange(n) * n_images)[:, None]
    counts = np.bincount(idx.ravel(), minlength=n * n_images).reshape(n, n_images)
    return np.ascontiguousarray(counts.T, dtype=np.float64)


def _count_matrix(rows: np.ndarray, images: np.ndarray, n_rows: int, n_images: int) -> sp.csr_matrix:
    return sp.csr_matrix(
        (np.ones(len(rows), dtype=np.float64), (rows, images)), shape=(n_rows, n_images)
    )


class _PiouStat:
    def __init__(self, m: PiouMatches, score_thresh: float):
        s = per_image_piou_stats(m, score_thresh)
        self.stats = np.stack([s["sum_iou"], s["tp"], s["fp"], s["fn"]], axis=1)  # (N, 4)
        self.size = 4

    def __call__(self, wt: np.ndarray) -> np.ndarray:
        s = self.stats.T @ wt
        den = s[1] + s[2] + s[3]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, s[0] / np.where(den > 0, den, 1), np.nan)


class _ApClass:
    """One class's IoU-``iou_thresh`` matches reduced to true-positive ranks and FP counts between them."""

    def __init__(self, data: DetectionData, cls: int, max_dets: int = 100, iou_thresh: float = 0.5):
        pm = data.pred_classes == cls
        gm = data.gt_classes == cls
        sub = DetectionData(
            image_ids=data.image_ids,
            gt_boxes=data.gt_boxes[gm],
            gt_image=data.gt_image[gm],
            gt_classes=data.gt_classes[gm],
            pred_boxes=data.pred_boxes[pm],
            pred_image=data.pred_image[pm],
            pred_scores=data.pred_scores[pm],
            pred_classes=data.pred_classes[pm],
        )
        n = data.num_images
        m = match_penalized_iou(sub, iou_thresh=iou_thresh, topk=max_dets)
        order = np.argsort(-m.score, kind="stable")
        matched = m.matched[order]
        img = m.image[order]
        self.tp_img = img[matched]
        # FP before the (k+1)-th TP belongs to segment k: it counts at TP rank k and later.
        seg = np.cumsum(matched)[~matched]
        fp_img = img[~matched]
        keep = seg < len(self.tp_img)
        self.fp_seg = _count_matrix(seg[keep], fp_img[keep], max(len(self.tp_img), 1), n)
        self.gt_count = np.bincount(sub.gt_image, minlength=n).astype(np.float64)
        self.size = max(len(self.tp_img), 1)

    def __call__(self, wt: np.ndarray) -> np.ndarray:
        return ap50_from_weights(self.tp_img, self.fp_seg, self.gt_count, wt)


def ap50_from_weights(tp_img: np.ndarray, fp_seg: sp.csr_matrix, gt_count: np.ndarray, wt: np.ndarray) -> np.ndarray:
    """COCO 101-point interpolated AP of one class for each weight column of ``wt`` (N, B)."""
    npig = gt_count @ wt  # (B,)
    b = wt.shape[1]
    ap = np.zeros(b)
    t = len(tp_img)
    if t:
        cum_tp = np.cumsum(wt[tp_img], axis=0)
        cum_fp = np.cumsum(fp_seg @ wt, axis=0)[:t]
        den = cum_tp + cum_fp
        with np.errstate(invalid="ignore", divide="ignore"):
            pr = np.where(den > 0, cum_tp / np.where(den > 0, den, 1), 0.0)
            rc = cum_tp / np.where(npig > 0, npig, 1)
        q = np.maximum.accumulate(pr[::-1], axis=0)[::-1]
        for j in range(b):
            inds = np.searchsorted(rc[:, j], COCO_REC_THRS, side="left")
            ok = inds < t
            ap[j] = q[inds[ok], j].sum() / len(COCO_REC_THRS)
    return np.where(npig > 0, ap, np.nan)


class _Ap50Stat:
    """Mean over classes of COCO AP at one IoU threshold (0.5 by default), in percent."""

    def __init__(self, data: DetectionData, iou_thresh: float = 0.5):
        self.classes = [_ApClass(data, c, iou_thresh=iou_thresh) for c in sorted(data.categories)]
        self.size = max([c.size for c in self.classes] + [1])

    def __call__(self, wt: np.ndarray) -> np.ndarray:
        per = np.stack([c(wt) for c in self.classes])
        with np.errstate(invalid="ignore"):
            valid = ~np.isnan(per)
            return np.where(valid.any(0), np.nansum(per, 0) / np.maximum(valid.sum(0), 1) * 100, np.nan)


class _CpmStat:
    def __init__(self, data: DetectionData, hit: str, iou: float, rates=FROC_RATES):
        h = froc_hits(data, hit, iou)
        n = data.num_images
        found = np.isfinite(h.truth_score)
        levels = np.unique(h.truth_score[found])[::-1]  # descending
        asc = levels[::-1]
        # truth at level j (index in descending order)
        t_lvl = len(levels) - 1 - np.searchsorted(asc, h.truth_score[found], side="left")
        # an FP of score f counts from the first level <= f on
        f_lvl = len(levels) - np.searchsorted(asc, h.fp_score, side="right")
        keep = f_lvl < len(levels)
        L = max(len(levels), 1)
        self.truth = _count_matrix(t_lvl, h.truth_image[found], L, n)
        self.fp = _count_matrix(f_lvl[keep], h.fp_image[keep], L, n)
        self.gt_count = np.bincount(h.truth_image, minlength=n).astype(np.float64)
        self.n_levels = len(levels)
        self.rates = np.asarray(rates, dtype=np.float64)
        self.size = L

    def __call__(self, wt: np.ndarray) -> np.ndarray:
        total = self.gt_count @ wt
        n_img = wt.sum(0)
        b = wt.shape[1]
        # beyond a resample's curve end its last sensitivity holds (froc's convention): every level counts
        if not self.n_levels:
            return np.where(total > 0, 0.0, np.nan)
        cum_t = np.cumsum(self.truth @ wt, axis=0)
        cum_f = np.cumsum(self.fp @ wt, axis=0)
        sens = np.zeros((len(self.rates), b))
        for i, r in enumerate(self.rates):
            cnt = (cum_f <= r * n_img[None, :] + 1e-9).sum(0)
            got = cum_t[np.maximum(cnt - 1, 0), np.arange(b)]
            sens[i] = np.where(cnt > 0, got, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, sens.mean(0) / np.where(total > 0, total, 1), np.nan)


class _AucStat:
    """Weighted Mann-Whitney AUC (ties count one half) over the images in ``mask``."""

    def __init__(self, y: np.ndarray, score: np.ndarray, mask: np.ndarray):
        n = len(y)
        idx = np.flatnonzero(mask)
        levels, lvl = np.unique(score[idx], return_inverse=True)
        L = max(len(levels), 1)
        pos = y[idx].astype(bool)
        self.pos = _count_matrix(lvl[pos], idx[pos], L, n)
        self.neg = _count_matrix(lvl[~pos], idx[~pos], L, n)
        self.size = L

    def __call__(self, wt: np.ndarray) -> np.ndarray:
        p = self.pos @ wt
        g = self.neg @ wt
        below = np.cumsum(g, axis=0) - g
        num = (p * (below + 0.5 * g)).sum(0)
        den = p.sum(0) * g.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _block(n_images: int, funcs: Sequence[Dict[str, Callable]], max_block: float = 4e6) -> int:
    """Resamples per batch: the weight matrix and the largest statistic stay near ``max_block`` numbers."""
    biggest = max([n_images] + [getattr(f, "size", 1) for fs in funcs for f in fs.values()])
    return int(np.clip(max_block // biggest, 1, 256))


def resampled_values(
    funcs: Sequence[Dict[str, Callable]], n_images: int, n_resamples: int, seed: int = 0, max_block: float = 4e6
) -> List[Dict[str, np.ndarray]]:
    """Each function set evaluated on the *same* ``n_resamples`` bootstrap resamples of the images.

    The one resampling loop (the report's CIs, subgroups, paired comparisons): the same ``seed``
    draws the same resamples everywhere. Returns one ``{name: (n_resamples,) values}`` per entry
    of ``funcs`` (paired across entries).
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    block = _block(n_images, funcs, max_block)
    parts: List[Dict[str, List[np.ndarray]]] = [{k: [] for k in fs} for fs in funcs]
    done = 0
    while done < n_resamples:
        b = min(block, n_resamples - done)
        wt = resample_weights(rng, n_images, b)
        for fs, acc in zip(funcs, parts):
            for k, f in fs.items():
                acc[k].append(f(wt))
        done += b
    return [{k: np.concatenate(v) for k, v in acc.items()} for acc in parts]


def percentile_ci(values: np.ndarray, level: float = 0.95) -> Dict[str, Optional[float]]:
    """Percentile interval of the finite resampled values (NaN when none) and how many there were."""
    ok = values[np.isfinite(values)]
    a = round(50.0 * (1 - level), 9)  # 2.5 exactly for 95% (not 2.5000000000000022)
    return {
        "low": float(np.percentile(ok, a)) if ok.size else float("nan"),
        "high": float(np.percentile(ok, 100 - a)) if ok.size else float("nan"),
        "n_valid": int(ok.size),
    }


def bootstrap_metrics(
    data: DetectionData,
    n_resamples: int = 1000,
    seed: int = 0,
    *,
    piou_matches: Optional[PiouMatches] = None,
    piou_score_thresh: float = 0.45,
    piou_iou_thresh: float = 0.0,
    piou_topk: int = 1,
    froc_hit: str = "iou",
    froc_iou: float = 0.5,
    with_malignancy: Optional[bool] = None,
    estimates: Optional[Dict[str, Optional[float]]] = None,
    max_block: float = 4e6,
) -> Dict[str, Any]:
    """Percentile 95% CIs of AP50, penalized IoU, CPM, image-level AUC (and malignancy AUC).

    Returns ``{"n_resamples", "seed", "method", "metrics": {name: {"estimate", "low", "high",
    "n_valid"}}}``; ``estimate`` is the full-set value (taken from ``estimates`` when given).
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    m = piou_matches if piou_matches is not None else match_penalized_iou(data, piou_iou_thresh, piou_topk)
    stats: Dict[str, Any] = {
        "AP50": _Ap50Stat(data),
        "piou": _PiouStat(m, piou_score_thresh),
        "cpm": _CpmStat(data, froc_hit, froc_iou),
    }
    has_lesion = data.gt_count_per_image() > 0
    stats["image_auc"] = _AucStat(has_lesion, top_score_per_image(data), np.ones(data.num_images, bool))
    ids = find_malignant_category(data.categories)
    if with_malignancy is None:
        with_malignancy = ids is not None
    if with_malignancy and ids is not None:
        truth_mal = np.zeros(data.num_images, dtype=bool)
        truth_mal[data.gt_image[data.gt_classes == ids["malignant"]]] = True
        score = top_score_per_image(data, ids["malignant"]) - top_score_per_image(data, ids["benign"])
        stats["malignancy_auc"] = _AucStat(truth_mal, score, has_lesion)

    n = data.num_images
    values = resampled_values([stats], n, n_resamples, seed, max_block)[0]
    full = np.ones((n, 1))
    out: Dict[str, Any] = {"n_resamples": int(n_resamples), "seed": int(seed), "method": "percentile", "metrics": {}}
    for k, f in stats.items():
        est = None if estimates is None else estimates.get(k)
        if est is None:
            est = float(f(full)[0])
        out["metrics"][k] = {"estimate": float(est) if est is not None else float("nan"), **percentile_ci(values[k])}
    return out
