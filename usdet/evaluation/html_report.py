"""``report.html``: the one page to open after an evaluation.

A single self-contained file (every image embedded as base64 PNG, no script, no network) with
the headline metrics and their bootstrap CIs, the plots that :mod:`usdet.evaluation.report`
drew, the worst false positives and misses (drawn by the overlay tool's code,
:func:`usdet.visualization.overlay.visualize_coco_results`) and, where given, the training
curves. Each metric cell carries ``data-key`` (its path in metrics.json) so that a test can check
the page against the file.
"""
from __future__ import annotations

import base64
import html
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from usdet.utils.io import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["write_html_report", "HEADLINE_METRICS", "metric_value"]

# (metrics.json path, label, bootstrap key or None, digits)
HEADLINE_METRICS: List[Tuple[str, str, Optional[str], int]] = [
    ("bbox.AP", "COCO AP (IoU 0.50:0.95, %)", None, 2),
    ("bbox.AP50", "AP50 (%)", "AP50", 2),
    ("bbox.AP75", "AP75 (%)", None, 2),
    ("piou.score", "Penalized IoU at the score threshold", "piou", 3),
    ("piou.best_score", "Penalized IoU, best over the threshold sweep", None, 3),
    ("froc.cpm", "FROC CPM (mean sensitivity at 1/8..8 FP/image)", "cpm", 3),
    ("image_level.auc", "Image level ROC AUC (lesion present)", "image_auc", 3),
    ("image_level.sensitivity", "Image level sensitivity", None, 3),
    ("image_level.specificity", "Image level specificity", None, 3),
    ("malignancy.auc", "Malignant vs benign ROC AUC", "malignancy_auc", 3),
]

_PLOT_CAPTIONS = {
    "pr_curves": "Precision-recall",
    "froc": "FROC",
    "roc": "ROC",
    "piou_sweep": "Penalized IoU vs score threshold",
    "confusion_matrix": "Confusion matrix",
}

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1200px;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}.grid{display:flex;flex-wrap:wrap;gap:1em}
figure{margin:0}figure img{max-width:560px;border:1px solid #ddd}figcaption{font-size:.9em;color:#555}
.wide img{max-width:100%}.note{color:#555;font-size:.9em}
"""


def metric_value(metrics: Dict[str, Any], path: str) -> Any:
    """The value at a dotted ``path`` of the metrics dict (None where absent)."""
    node: Any = metrics
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _fmt(v: Any, digits: int) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "n/a"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return html.escape(str(v))
    return f"{v:.{digits}f}"


def _img_tag(path: str, alt: str) -> str:
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _figure(path: str, caption: str, wide: bool = False) -> str:
    cls = ' class="wide"' if wide else ""
    return f"<figure{cls}>{_img_tag(path, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _metrics_table(metrics: Dict[str, Any]) -> str:
    boot = (metrics.get("bootstrap") or {}).get("metrics", {})
    rows = []
    for path, label, bkey, digits in HEADLINE_METRICS:
        if metric_value(metrics, path.rsplit(".", 1)[0]) is None:
            continue  # e.g. no malignancy section for one class
        value = metric_value(metrics, path)
        ci = boot.get(bkey) if bkey else None
        low = _fmt(ci.get("low"), digits) if ci else ""
        high = _fmt(ci.get("high"), digits) if ci else ""
        rows.append(
            f'<tr><td>{html.escape(label)}</td><td class="metric" data-key="{path}" data-digits="{digits}">'
            f"{_fmt(value, digits)}</td><td>{low}</td><td>{high}</td></tr>"
        )
    n = (metrics.get("bootstrap") or {}).get("n_resamples")
    ci_head = f"95% CI ({n} bootstrap resamples)" if n else "95% CI (no bootstrap)"
    return (
        f'<table id="metrics"><tr><th>metric</th><th>value</th><th colspan="2">{ci_head}</th></tr>'
        + "".join(rows)
        + "</table>"
    )


def _counts_table(metrics: Dict[str, Any]) -> str:
    p, il = metrics["piou"], metrics["image_level"]
    cells = [
        ("piou.tp", "TP", p["tp"]), ("piou.fp", "FP", p["fp"]), ("piou.fn", "FN", p["fn"]), ("piou.tn", "TN", p["tn"]),
        ("image_level.tp", "lesion images called", il["tp"]), ("image_level.fp", "normal images called", il["fp"]),
    ]
    head = "".join(f"<th>{html.escape(name)}</th>" for _, name, _ in cells)
    body = "".join(f'<td class="metric" data-key="{k}" data-digits="0">{int(v)}</td>' for k, _, v in cells)
    return f"<table><tr>{head}</tr><tr>{body}</tr></table>"


def _worst_cases(
    gt: Dict[str, Any], predictions: Sequence[Dict[str, Any]], image_root: str, out_dir: str,
    score_thresh: float, iou_thresh: float, worst_k: int,
) -> str:
    """HTML of the contact sheets of the worst false positives and misses (or why there are none)."""
    images = gt.get("images", [])
    named = bool(images) and all("file_name" in im for im in images)
    first = os.path.join(image_root, images[0]["file_name"]) if named else ""
    if not named or not os.path.isfile(first):
        why = ("no images in the ground truth" if not images else
               "the ground truth names no image files" if not named else f"images not found under {image_root}")
        return f'<p class="note">Not drawn: {html.escape(why)}.</p>'
    from usdet.visualization.overlay import visualize_coco_results  # imports detectron2: only when drawing

    summary = visualize_coco_results(gt, predictions, image_root, out_dir, conf_threshold=score_thresh,
                                     iou_thresh=iou_thresh, worst_k=worst_k, progress=False, image_overlays=False)
    rule = f"score >= {score_thresh:g}, a hit is IoU >= {iou_thresh:g}"
    out = []
    for key, sheet, what in (("fp", "worst_false_positives.png", "false positives"),
                             ("fn", "worst_misses.png", "missed lesions")):
        count = int(summary["boxes"][key])
        sheet = os.path.join(out_dir, sheet)
        if count and os.path.isfile(sheet):
            out.append(_figure(sheet, f"{count} {what} ({rule}); the worst {min(count, worst_k)} shown", wide=True))
        else:
            out.append(f'<p class="note">{count} {what} ({rule}).</p>')
    return "".join(out)


def write_html_report(
    output_dir: str,
    metrics: Dict[str, Any],
    *,
    gt: Optional[Dict[str, Any]] = None,
    predictions: Optional[Sequence[Dict[str, Any]]] = None,
    image_root: Optional[str] = None,
    training_metrics: Optional[str] = None,
    title: Optional[str] = None,
    worst_k: int = 8,
) -> str:
    """Write ``output_dir/report.html`` from ``metrics`` and the PNGs beside it; return its path.

    ``gt`` + ``predictions`` + ``image_root`` add the worst-case sheets (score threshold: the
    penalized-IoU one; a hit: IoU >= the FROC IoU); ``training_metrics`` (detectron2's event file
    of the run) adds the training curves.
    """
    parts: List[str] = []
    inp = metrics["inputs"]
    heading = title or "Detection evaluation report"
    parts.append(f"<h1>{html.escape(heading)}</h1>")
    parts.append(
        f'<p>Ground truth <code>{html.escape(str(inp["ground_truth"]))}</code>: {inp["num_images"]} images '
        f'({inp["num_lesion_images"]} with lesions), {inp["num_truth_boxes"]} truth boxes. Predictions '
        f'<code>{html.escape(str(inp["predictions"]))}</code>: {inp["num_predictions"]} detections. '
        f'Score threshold {metrics["piou"]["score_thresh"]:g}. Full tables: report.md, metrics.json.</p>'
    )
    if metrics.get("warnings"):
        items = "".join(f"<li>{html.escape(str(w))}</li>" for w in metrics["warnings"])
        parts.append(f"<h2>Input problems</h2><ul>{items}</ul>")
    parts.append("<h2>Metrics</h2>" + _metrics_table(metrics) + "<p></p>" + _counts_table(metrics))

    plots = metrics.get("plots") or {}
    figs = [
        _figure(os.path.join(output_dir, fname), _PLOT_CAPTIONS.get(key, key))
        for key, fname in plots.items()
        if os.path.isfile(os.path.join(output_dir, fname))
    ]
    if figs:
        parts.append('<h2>Curves and confusion matrix</h2><div class="grid">' + "".join(figs) + "</div>")

    if gt is not None and predictions is not None and image_root:
        parts.append("<h2>Worst false positives and misses</h2>")
        parts.append(_worst_cases(
            gt, predictions, image_root, os.path.join(output_dir, "worst_cases"),
            float(metrics["piou"]["score_thresh"]), float(metrics["froc"].get("iou_thresh") or 0.5), worst_k,
        ))

    if training_metrics:
        curves = _training_curves(training_metrics, output_dir)
        parts.append("<h2>Training curves</h2>")
        where = os.path.abspath(training_metrics)
        source = os.path.join(os.path.basename(os.path.dirname(where)), os.path.basename(where))
        parts.append(_figure(curves, f"training curves from {source}", wide=True) if curves else
                     f'<p class="note">No readable records in {html.escape(training_metrics)}.</p>')

    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(heading)}</title><style>{_STYLE}</style></head>"
        f"<body>{''.join(parts)}</body></html>\n"
    )
    path = os.path.join(output_dir, "report.html")
    atomic_write_text(path, page)
    return path


def _training_curves(metrics_file: str, output_dir: str) -> Optional[str]:
    from .plots import plot_training_curves, read_event_metrics

    if os.path.isdir(metrics_file):
        metrics_file = os.path.join(metrics_file, "metrics.json")
    try:
        records, _ = read_event_metrics(metrics_file)
        if not records:
            return None
        return plot_training_curves({"training": records}, os.path.join(output_dir, "training_curves.png"))
    except (OSError, ValueError) as e:
        logger.warning("No training curves in report.html: %s", e)
        return None
