"""Paired comparison of two models' detections on the same images.

With about a hundred test images, each model's own interval is wide, but the two models are
scored on the *same* images, so most of that variation cancels in their difference. Two tests:

* paired bootstrap over images: every resample draws the same images for both models and the
  difference ``second - first`` of AP50, AP, penalized IoU and CPM is taken on it; 95%
  percentile interval; two-sided p-value ``min(1, 2 * (min(#{d <= 0}, #{d >= 0}) + 1) / (B + 1))``
  (identical models give d = 0 on every resample, hence p = 1);
* DeLong's test (DeLong, DeLong & Clarke-Pearson, Biometrics 1988) for the difference of the
  image-level ROC AUCs (top detection score per image, lesion present vs absent): placement
  values of each positive among the negatives and of each negative among the positives, their
  covariance across the two models, a normal approximation. 0/0 (identical scores) is p = 1.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from usdet.utils.io import atomic_write_json, atomic_write_text

from .classification import top_score_per_image
from .formatting import fmt_value, markdown_table
from .inputs import DetectionData, EvaluationInputError, load_detection_data, load_gt_json
from .weighted import full_values, metric_functions, percentile_ci, resampled_values

__all__ = ["delong_test", "paired_bootstrap_p", "compare_models", "render_comparison", "extended_notes"]

#: Metrics compared by paired bootstrap; the image-level AUC goes through DeLong's test.
BOOTSTRAP_METRICS = ("AP50", "AP", "piou", "cpm")
LABELS = {
    "AP50": "AP50 (%)",
    "AP": "AP (%)",
    "piou": "penalized IoU",
    "cpm": "CPM (FROC)",
    "sens@0.5": "sensitivity @ 0.5 FP/img",
    "sens@1": "sensitivity @ 1 FP/img",
    "image_auc": "image-level ROC AUC",
}


def _placements(y: np.ndarray, score: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """DeLong's placement values: V10 of each positive among the negatives, V01 of each negative
    among the positives (a tie counts one half)."""
    pos, neg = np.sort(score[y]), np.sort(score[~y])
    xs, ys = score[y], score[~y]
    v10 = (np.searchsorted(neg, xs, "left") + np.searchsorted(neg, xs, "right")) / (2.0 * len(neg))
    v01 = (2 * len(pos) - np.searchsorted(pos, ys, "left") - np.searchsorted(pos, ys, "right")) / (2.0 * len(pos))
    return v10, v01


def delong_test(y_true: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, level: float = 0.95) -> Dict[str, Any]:
    """DeLong's test of AUC(b) - AUC(a) for two scores of the same cases.

    Returns ``auc_a, auc_b, delta, se, low, high, z, p_value`` (NaN where undefined: fewer than two
    positives or negatives).
    """
    from scipy.stats import norm

    y = np.asarray(y_true, dtype=bool)
    m, n = int(y.sum()), int((~y).sum())
    nan = float("nan")
    if m < 2 or n < 2:
        return {"auc_a": nan, "auc_b": nan, "delta": nan, "se": nan, "low": nan, "high": nan, "z": nan,
                "p_value": nan, "num_positive": m, "num_negative": n}
    v10, v01 = zip(*(_placements(y, np.asarray(s, dtype=np.float64)) for s in (score_a, score_b)))
    v10, v01 = np.stack(v10), np.stack(v01)  # (2, m), (2, n)
    auc = v10.mean(axis=1)
    s10 = np.cov(v10, ddof=1)
    s01 = np.cov(v01, ddof=1)
    contrast = np.array([-1.0, 1.0])
    var = float(contrast @ s10 @ contrast / m + contrast @ s01 @ contrast / n)
    delta = float(auc[1] - auc[0])
    se = float(np.sqrt(max(var, 0.0)))
    if se <= 1e-12:
        # No variance: equal AUCs (z 0), or a difference with no spread, whose z is unbounded
        # (None: JSON has no infinity, and the report must still be written).
        z = 0.0 if abs(delta) <= 1e-12 else None
        p = 1.0 if abs(delta) <= 1e-12 else 0.0
    else:
        z = delta / se
        p = float(2 * norm.sf(abs(z)))
    q = float(norm.ppf(0.5 + level / 2))
    return {"auc_a": float(auc[0]), "auc_b": float(auc[1]), "delta": delta, "se": se,
            "low": delta - q * se, "high": delta + q * se, "z": z, "p_value": min(p, 1.0),
            "num_positive": m, "num_negative": n}


def paired_bootstrap_p(deltas: np.ndarray) -> float:
    """Two-sided bootstrap p-value of ``delta = 0`` from the resampled differences (NaN dropped)."""
    d = deltas[np.isfinite(deltas)]
    if not d.size:
        return float("nan")
    tail = min(int(np.sum(d <= 0)), int(np.sum(d >= 0)))
    return float(min(1.0, 2.0 * (tail + 1) / (d.size + 1)))


def interval_verdict(delta: Dict[str, Any], better: str = "better", worse: str = "worse") -> str:
    """A paired difference's interval (``compare_models``' ``delta``) in words: ``better`` when it
    excludes 0 from below, ``worse`` from above, else ``no detectable difference`` (what every
    choice made on a small val split must be able to say)."""
    if delta.get("low") is not None and delta["low"] > 0:
        return better
    if delta.get("high") is not None and delta["high"] < 0:
        return worse
    return "no detectable difference"


def compare_models(
    gt_json: Any,
    predictions: "OrderedDict[str, Any]",
    output_dir: Optional[str] = None,
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    piou_score_thresh: float = 0.45,
    piou_iou_thresh: float = 0.0,
    piou_topk: int = 1,
    froc_hit: str = "iou",
    froc_iou: float = 0.5,
    plots: bool = True,
) -> Dict[str, Any]:
    """Compare two models (``{name: predictions path or list}``, first → second) on ``gt_json``.

    Writes ``comparison.json``, ``comparison.md`` and ``comparison.png`` into ``output_dir`` when
    given. ``metrics[name]`` holds ``values`` (each model on the full set) and ``delta``
    (``estimate`` = second - first, ``low``, ``high``, ``p_value``, ``method``).
    """
    if len(predictions) != 2:
        raise ValueError(f"compare_models needs exactly two models, got {len(predictions)}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    names = list(predictions)
    if names[0] == names[1]:
        raise ValueError(f"the two models need different names, got {names[0]!r} twice")
    gt_raw = load_gt_json(gt_json) if isinstance(gt_json, str) else gt_json
    gt_name = gt_json if isinstance(gt_json, str) else "ground truth"
    datas: List[DetectionData] = []
    warnings: List[str] = []
    for name in names:
        p = predictions[name]
        _, d, w = load_detection_data(gt_raw, p, gt_name, p if isinstance(p, str) else name)
        datas.append(d)
        warnings += [x for x in w if x not in warnings]
    opts = dict(piou_score_thresh=piou_score_thresh, piou_iou_thresh=piou_iou_thresh, piou_topk=piou_topk,
                froc_hit=froc_hit, froc_iou=froc_iou)
    funcs = [metric_functions(d, BOOTSTRAP_METRICS, **opts) for d in datas]
    n = datas[0].num_images
    full = [full_values(f, n) for f in funcs]
    boot = resampled_values(funcs, n, n_resamples, seed)
    out: "OrderedDict[str, Any]" = OrderedDict()
    out["ground_truth"] = os.path.basename(gt_name)
    out["models"] = names
    out["predictions"] = {k: os.path.basename(v) if isinstance(v, str) else k for k, v in predictions.items()}
    out["num_images"] = n
    out["num_lesion_images"] = int((datas[0].gt_count_per_image() > 0).sum())
    out["num_truth_boxes"] = int(len(datas[0].gt_image))
    out["n_resamples"] = int(n_resamples)
    out["seed"] = int(seed)
    out["piou_score_thresh"] = float(piou_score_thresh)
    metrics: "OrderedDict[str, Any]" = OrderedDict()
    for k in BOOTSTRAP_METRICS:
        d = boot[1][k] - boot[0][k]
        ci = percentile_ci(d)
        metrics[k] = {
            "values": {names[0]: full[0][k], names[1]: full[1][k]},
            "delta": {"estimate": full[1][k] - full[0][k], "low": ci["low"], "high": ci["high"],
                      "p_value": paired_bootstrap_p(d), "n_valid": ci["n_valid"], "method": "paired bootstrap"},
        }
    y = datas[0].gt_count_per_image() > 0
    dl = delong_test(y, top_score_per_image(datas[0]), top_score_per_image(datas[1]))
    metrics["image_auc"] = {
        "values": {names[0]: dl["auc_a"], names[1]: dl["auc_b"]},
        "delta": {"estimate": dl["delta"], "low": dl["low"], "high": dl["high"], "p_value": dl["p_value"],
                  "se": dl["se"], "z": dl["z"], "method": "DeLong"},
    }
    out["metrics"] = metrics
    # CPM beyond a curve's end carries its last sensitivity (froc's convention): say where it does
    from .froc import froc

    ends = [froc(d, froc_hit, froc_iou) for d in datas]
    out["froc_extended_rates"] = {nm: f["extended_rates"] for nm, f in zip(names, ends)}
    out["froc_curve_end"] = {nm: f["max_fps_per_image"] for nm, f in zip(names, ends)}
    out["warnings"] = warnings
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        if plots:
            from .interval_plots import plot_intervals

            rows = {LABELS[k]: [(f"{names[1]} - {names[0]}", "delta", v["delta"]["estimate"], v["delta"]["low"],
                                 v["delta"]["high"])] for k, v in metrics.items()}
            plot_intervals(rows, os.path.join(output_dir, "comparison.png"),
                           f"{names[1]} - {names[0]} on {n} images (95% CI)", reference=0.0)
            out["plot"] = "comparison.png"
        atomic_write_json(os.path.join(output_dir, "comparison.json"), out)
        atomic_write_text(os.path.join(output_dir, "comparison.md"), render_comparison(out))
    return out


def render_comparison(c: Dict[str, Any]) -> str:
    """Markdown table of a :func:`compare_models` result."""
    a, b = c["models"]
    lines = [
        f"# {b} vs {a}\n\n",
        f"- Ground truth `{c['ground_truth']}`: {c['num_images']} images ({c['num_lesion_images']} with lesions), "
        f"{c['num_truth_boxes']} truth boxes.\n",
        f"- {a}: `{c['predictions'][a]}`; {b}: `{c['predictions'][b]}`.\n",
        f"- Delta = {b} - {a}. AP50, AP, penalized IoU (s = {c['piou_score_thresh']:g}) and CPM: paired bootstrap "
        f"over images ({c['n_resamples']} resamples, seed {c['seed']}, the same images for both models), 95% "
        "percentile interval, two-sided p. Image-level ROC AUC: DeLong's test (normal approximation).\n\n",
    ]
    rows = []
    for k, v in c["metrics"].items():
        d = v["delta"]
        rows.append([LABELS.get(k, k), v["values"][a], v["values"][b], d["estimate"],
                     f"[{fmt_value(d['low'])}, {fmt_value(d['high'])}]", d["p_value"], d["method"]])
    lines.append(markdown_table(["metric", a, b, "delta", "95% CI", "p", "test"], rows))
    notes = extended_notes(c)
    if notes:
        lines.append("\n" + "".join(f"- {n}\n" for n in notes))
    if c.get("plot"):
        lines.append(f"\n![differences with 95% CIs]({c['plot']})\n")
    if c.get("warnings"):
        lines.append("\n## Input problems\n\n" + "".join(f"- {w}\n" for w in c["warnings"]))
    return "".join(lines)


def extended_notes(c: Dict[str, Any]) -> List[str]:
    """One line per model whose CPM uses extended FROC rates (sensitivity carried past its curve's end)."""
    out = []
    for name, rates in c.get("froc_extended_rates", {}).items():
        if rates:
            out.append(f"CPM of {name}: its FROC curve ends at {c['froc_curve_end'][name]:.3g} FP/image (no more "
                       f"detections); at {', '.join(f'{r:g}' for r in rates)} FP/image its last sensitivity is carried "
                       "on (extended rates)")
    return out


def parse_model_args(items: Sequence[str]) -> "OrderedDict[str, str]":
    """``["A=a.json", "B=b.json"]`` → ordered ``{name: path}``; a bare path is named by its folder
    (``runs/busi/model_best.pth`` → ``busi``)."""
    out: "OrderedDict[str, str]" = OrderedDict()
    for it in items:
        name, sep, path = it.partition("=")
        if not sep:
            name, path = os.path.basename(os.path.dirname(os.path.abspath(it))), it
        if not name or not path:
            raise ValueError(f"{it!r}: expected NAME=PATH")
        if name in out:
            raise ValueError(f"{it!r}: the name {name!r} is given twice (name them: NAME=PATH)")
        out[name] = path
    return out


__all__ += ["parse_model_args", "EvaluationInputError"]
