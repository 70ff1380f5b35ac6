"""An operating point a clinician can use: a score threshold chosen on val, judged on test.

The image-level call is "lesion present" when the image's top detection score is at or above the
threshold (as in :func:`usdet.evaluation.classification.image_level`). The threshold is the
highest one whose *validation* sensitivity reaches the target (e.g. 0.95: miss at most 1 lesion
image in 20); the test set then says what that costs in specificity. Choosing it on test would
report a figure no new site would see. Intervals are Wilson 95% intervals of a proportion:
with few lesion-free images (BUSI test has 20) specificity is known only roughly.
"""
from __future__ import annotations

import math
from typing import Any, Dict

import numpy as np

from .classification import binary_metrics, top_score_per_image
from .formatting import fmt_estimate, fmt_value
from .inputs import DetectionData, load_detection_data

__all__ = ["choose_threshold", "apply_threshold", "wilson_interval", "render_operating_point"]


def wilson_interval(k: int, n: int, level: float = 0.95) -> Dict[str, float]:
    """Wilson score interval of ``k`` successes in ``n`` (NaN for n = 0)."""
    if n <= 0:
        return {"low": float("nan"), "high": float("nan")}
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return {"low": float(ci.low), "high": float(ci.high)}


def _calls(data: DetectionData, thresh: float) -> Dict[str, Any]:
    y = data.gt_count_per_image() > 0
    bm = binary_metrics(y, top_score_per_image(data) >= thresh)
    out = {k: bm[k] for k in ("sensitivity", "specificity", "ppv", "npv", "tp", "fp", "tn", "fn")}
    out["sensitivity_ci"] = wilson_interval(bm["tp"], bm["tp"] + bm["fn"])
    out["specificity_ci"] = wilson_interval(bm["tn"], bm["tn"] + bm["fp"])
    out["num_lesion_images"] = int(y.sum())
    out["num_normal_images"] = int((~y).sum())
    return out


def choose_threshold(val: DetectionData, target_sensitivity: float = 0.95) -> Dict[str, Any]:
    """Highest score threshold whose image-level sensitivity on ``val`` is >= the target.

    Lesion images without any detection have top score 0, so a target only reachable by calling
    them gives threshold 0 (every image called "lesion"): that is reported, not hidden.
    """
    if not 0 < target_sensitivity <= 1:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target_sensitivity}")
    y = val.gt_count_per_image() > 0
    m = int(y.sum())
    if m == 0:
        raise ValueError("the validation set has no lesion image: no sensitivity to aim at")
    pos = np.sort(top_score_per_image(val)[y])[::-1]
    k = int(math.ceil(target_sensitivity * m - 1e-9))
    thresh = float(pos[k - 1])
    out: Dict[str, Any] = {"target_sensitivity": float(target_sensitivity), "score_thresh": thresh,
                           "num_val_images": int(val.num_images)}
    out["val"] = _calls(val, thresh)
    return out


def apply_threshold(op: Dict[str, Any], test: DetectionData) -> Dict[str, Any]:
    """``op`` (from :func:`choose_threshold`) with the test set's calls at its threshold added."""
    out = dict(op)
    out["test"] = _calls(test, float(op["score_thresh"]))
    return out


def render_operating_point(op: Dict[str, Any]) -> str:
    """Markdown section of an operating point (val and test rows)."""
    lines = [
        "\n## Operating point chosen on val\n\n",
        f"Threshold = highest top-detection score whose validation sensitivity (lesion present per image) "
        f"reaches {op['target_sensitivity']:g}: **s = {fmt_value(op['score_thresh'], 4)}**. Wilson 95% intervals.\n\n",
        "| set | sensitivity | specificity | TP | FN | TN | FP | lesion images | lesion-free images |\n",
        "|---|---|---|---|---|---|---|---|---|\n",
    ]
    for name in ("val", "test"):
        if name not in op:
            continue
        r = op[name]
        sens = fmt_estimate({"estimate": r["sensitivity"], **r["sensitivity_ci"]})
        spec = fmt_estimate({"estimate": r["specificity"], **r["specificity_ci"]})
        lines.append(f"| {name} | {sens} | {spec} | {r['tp']} | {r['fn']} | {r['tn']} | {r['fp']} | "
                     f"{r['num_lesion_images']} | {r['num_normal_images']} |\n")
    return "".join(lines)


def operating_point_from_files(val_gt: Any, val_pred: Any, target_sensitivity: float) -> Dict[str, Any]:
    """:func:`choose_threshold` on a val ground truth and its detections (paths or loaded)."""
    _, val, _ = load_detection_data(val_gt, val_pred)
    return choose_threshold(val, target_sensitivity)


__all__ += ["operating_point_from_files"]

