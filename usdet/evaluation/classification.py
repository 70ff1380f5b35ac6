"""Image-level reading of a detector: is there a lesion, and is it malignant?

Clinicians often ask the per-image question the detector implicitly answers. Lesion present vs
absent uses the top detection score per image (0 when the image has no detection). Malignant vs
benign is scored on lesion images only: the malignancy score is the top malignant detection
score minus the top benign one (0 for a class without detection), and the call at the chosen
score threshold is the class of the top detection at or above it ("no detection" otherwise,
which counts as "not malignant").
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np

from .inputs import DetectionData

__all__ = ["top_score_per_image", "binary_metrics", "roc", "image_level", "malignancy", "find_malignant_category"]


def top_score_per_image(data: DetectionData, category: Optional[int] = None) -> np.ndarray:
    """Highest prediction score of each image (optionally of one category), 0 where none."""
    top = np.zeros(data.num_images, dtype=np.float64)
    sel = slice(None) if category is None else data.pred_classes == category
    if len(data.pred_scores):
        np.maximum.at(top, data.pred_image[sel], data.pred_scores[sel])
    return top


def _ratio(a: float, b: float) -> float:
    return float(a) / float(b) if b else float("nan")


def binary_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> Dict[str, Any]:
    """Counts and sensitivity / specificity / PPV / NPV / accuracy of a binary call."""
    y_true = np.asarray(y_true, dtype=bool)
    y_pred = np.asarray(y_pred, dtype=bool)
    tp = int(np.sum(y_true & y_pred))
    fp = int(np.sum(~y_true & y_pred))
    tn = int(np.sum(~y_true & ~y_pred))
    fn = int(np.sum(y_true & ~y_pred))
    return {
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "accuracy": _ratio(tp + tn, len(y_true)),
    }


def roc(y_true: np.ndarray, score: np.ndarray) -> Dict[str, Any]:
    """ROC curve at every distinct score (from (0, 0)) and its AUC, by scikit-learn.

    AUC is NaN when only one class is present (scikit-learn raises there).
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    y_true = np.asarray(y_true, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    if y_true.all() or not y_true.any():
        return {"auc": float("nan"), "fpr": [], "tpr": [], "thresholds": []}
    fpr, tpr, thr = roc_curve(y_true, score, drop_intermediate=False)
    thr = np.where(np.isfinite(thr), thr, np.nan)  # the (0, 0) point has no threshold
    return {"auc": float(roc_auc_score(y_true, score)), "fpr": fpr.tolist(), "tpr": tpr.tolist(),
            "thresholds": thr.tolist()}


def image_level(data: DetectionData, score_thresh: float = 0.45) -> Dict[str, Any]:
    """Lesion present vs absent per image from the top score (AUC; sens/spec/PPV/NPV at the threshold)."""
    y = data.gt_count_per_image() > 0
    top = top_score_per_image(data)
    out: Dict[str, Any] = {
        "num_images": int(data.num_images),
        "num_lesion_images": int(y.sum()),
        "num_normal_images": int((~y).sum()),
        "score_thresh": float(score_thresh),
    }
    r = roc(y, top)
    out["auc"] = r["auc"]
    out.update(binary_metrics(y, top >= score_thresh))
    out["roc"] = {"fpr": r["fpr"], "tpr": r["tpr"]}
    return out


def find_malignant_category(categories: Dict[int, str]) -> Optional[Dict[str, int]]:
    """``{"malignant": id, "benign": id}`` for a two-class benign/malignant set, else None."""
    if len(categories) != 2:
        return None
    by_name = {name.lower(): cid for cid, name in categories.items()}
    if "malignant" in by_name and "benign" in by_name:
        return {"malignant": by_name["malignant"], "benign": by_name["benign"]}
    return None


def malignancy(data: DetectionData, score_thresh: float = 0.45) -> Optional[Dict[str, Any]]:
    """Malignant vs benign on lesion images: ROC AUC, confusion matrix, sensitivity/specificity.

    None unless the categories are exactly ``benign`` and ``malignant``.
    """
    ids = find_malignant_category(data.categories)
    if ids is None:
        return None
    mal, ben = ids["malignant"], ids["benign"]
    has_lesion = data.gt_count_per_image() > 0
    truth_mal = np.zeros(data.num_images, dtype=bool)
    truth_mal[data.gt_image[data.gt_classes == mal]] = True
    score = top_score_per_image(data, mal) - top_score_per_image(data, ben)
    # Class of the top detection at or above the threshold: 1 malignant, 0 benign, -1 none.
    call = np.full(data.num_images, -1, dtype=np.int64)
    kept = data.pred_scores >= score_thresh
    if kept.any():
        order = np.lexsort((-data.pred_scores[kept], data.pred_image[kept]))
        img = data.pred_image[kept][order]
        first = np.r_[True, img[1:] != img[:-1]]
        call[img[first]] = (data.pred_classes[kept][order][first] == mal).astype(np.int64)
    lesion = np.flatnonzero(has_lesion)
    y = truth_mal[lesion]
    c = call[lesion]
    r = roc(y, score[lesion])
    labels = ["benign", "malignant"]
    columns = ["benign", "malignant", "no detection"]
    matrix = [[int(np.sum((y == bool(t)) & (c == p))) for p in (0, 1, -1)] for t in (0, 1)]
    out: Dict[str, Any] = {
        "num_images": int(len(lesion)),
        "num_malignant": int(y.sum()),
        "num_benign": int((~y).sum()),
        "score_thresh": float(score_thresh),
        "auc": r["auc"],
        "confusion_matrix": {"rows_truth": labels, "columns_predicted": columns, "counts": matrix},
    }
    bm = binary_metrics(y, c == 1)
    out.update({k: bm[k] for k in ("tp", "fp", "tn", "fn", "sensitivity", "specificity", "ppv", "npv", "accuracy")})
    out["roc"] = {"fpr": r["fpr"], "tpr": r["tpr"]}
    return out
