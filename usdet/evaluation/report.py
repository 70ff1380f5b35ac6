"""One call from saved predictions to ``metrics.json``, ``report.md`` and plots.

Used by ``tools/evaluate_json.py`` and by the trainer's ``--eval-only``, so that offline and
training-time numbers are the same computation. Inputs are checked first: problems (unknown
image or category ids, missing keys, degenerate or out-of-image truth boxes) are listed in the
report, naming the file, and everything valid is still scored.
"""
from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Union

from usdet.utils.io import atomic_write_json, atomic_write_text

from .bootstrap import bootstrap_metrics
from .classification import image_level, malignancy
from .coco_metrics import PARALLEL_MIN_DETECTIONS, class_agnostic, coco_bbox_metrics
from .formatting import fmt_value, markdown_table
from .froc import froc
from .html_report import write_html_report
from .inputs import EvaluationInputError, coco_with_index_ids, load_inputs
from .operating_point import apply_threshold, render_operating_point
from .parallel import Beside
from .penalized_iou import match_penalized_iou, penalized_iou_from_matches
from .subgroups import group_values, render_subgroups, subgroup_tables

logger = logging.getLogger(__name__)

__all__ = ["evaluate_predictions", "render_report", "EvaluationInputError"]


def evaluate_predictions(
    gt_json: Union[str, Dict[str, Any]],
    predictions: Union[str, Sequence[Dict[str, Any]]],
    output_dir: str,
    *,
    piou_score_thresh: float = 0.45,
    piou_iou_thresh: float = 0.0,
    piou_topk: int = 1,
    piou_class_aware: bool = False,
    froc_hit: str = "iou",
    froc_iou: float = 0.5,
    score_thresh: Optional[float] = None,
    bootstrap: int = 1000,
    seed: int = 0,
    plots: bool = True,
    title: Optional[str] = None,
    by: Sequence[str] = (),
    operating_point: Optional[Dict[str, Any]] = None,
    html: bool = True,
    image_root: Optional[str] = None,
    training_metrics: Optional[str] = None,
) -> Dict[str, Any]:
    """Score ``predictions`` against ``gt_json``; write ``metrics.json``, ``report.md`` and PNG plots.

    Args:
        gt_json: COCO ground-truth file (or an already loaded dict).
        predictions: detectron2 ``coco_instances_results.json`` path or its list
            ``[{image_id, category_id, bbox (xywh), score}]``.
        output_dir: folder for the outputs (created).
        piou_*: penalized IoU score threshold, IoU threshold, top-k, class-aware switch.
        froc_hit, froc_iou: FROC hit rule (``"iou"`` with ``froc_iou`` or ``"center"``).
        score_thresh: threshold of the image-level calls (default: ``piou_score_thresh``).
        bootstrap: number of image resamples for 95% CIs (0 = none); ``seed`` makes them repeatable.
        plots: write the PNG plots.
        by: image attributes for subgroup tables (:mod:`.subgroups`), e.g. ``("device", "size")``.
        operating_point: a threshold chosen on val (:func:`.operating_point.choose_threshold`);
            the test calls at it are added.
        html: also write ``report.html`` (:mod:`.html_report`); ``image_root`` (default: the
            layout root above ``gt_json``) for its worst-case sheets, ``training_metrics``
            (the run's detectron2 metrics.json) for its training curves.

    Returns:
        The dict written to ``metrics.json``.
    """
    t0 = time.perf_counter()
    if froc_hit not in ("iou", "center"):
        raise ValueError(f"froc_hit must be 'iou' or 'center', got {froc_hit!r}")
    if piou_topk < 1:
        raise ValueError(f"piou_topk must be >= 1, got {piou_topk}")
    score_thresh = piou_score_thresh if score_thresh is None else float(score_thresh)
    inputs = load_inputs(gt_json, predictions)
    gt, preds, data, warnings = inputs.gt, inputs.predictions, inputs.data, inputs.warnings
    gt_name, pred_name = inputs.gt_name, inputs.pred_name
    if by:  # an attribute no image has fails here, before anything is written
        for attr in by:
            group_values(gt, data, attr, gt_name)
    os.makedirs(output_dir, exist_ok=True)

    metrics: "OrderedDict[str, Any]" = OrderedDict()
    metrics["inputs"] = {
        "ground_truth": os.path.basename(gt_name),
        "predictions": os.path.basename(pred_name),
        "num_images": data.num_images,
        "num_lesion_images": int((data.gt_count_per_image() > 0).sum()),
        "num_truth_boxes": int(len(data.gt_image)),
        "num_predictions": int(len(data.pred_scores)),
        "num_predictions_ignored": int(inputs.num_raw_predictions - len(preds)),
        "num_ignore_regions": int(len(data.ignore_image)),
        "num_predictions_in_ignore_regions": int(data.num_ignored_predictions),
        "categories": [str(c.get("name", c["id"])) for c in gt["categories"]],
    }

    timing = {"read_and_check": time.perf_counter() - t0}
    lap = time.perf_counter()

    def mark(stage: str) -> None:
        nonlocal lap
        now = time.perf_counter()
        timing[stage] = round(now - lap, 3)
        lap = now

    # Penalized IoU
    m = match_penalized_iou(data, piou_iou_thresh, piou_topk, piou_class_aware)
    piou = penalized_iou_from_matches(m, piou_score_thresh)
    metrics["piou"] = piou
    mark("piou")

    # FROC
    fr = froc(data, froc_hit, froc_iou)
    froc_curve = fr.pop("curve")
    metrics["froc"] = fr

    # Image level and malignancy
    il = image_level(data, score_thresh)
    il_roc = il.pop("roc")
    metrics["image_level"] = il
    mal = malignancy(data, score_thresh)
    mal_roc = None
    if mal is not None:
        mal_roc = mal.pop("roc")
        metrics["malignancy"] = mal
    mark("froc_and_image_level")

    # COCO AP per class (here) and class-agnostic + bootstrap CIs (beside it, in a forked child
    # for large sets: each COCO evaluation of a million detections takes many seconds).
    gt_coco = coco_with_index_ids(gt)
    coco_preds = preds.to_coco(index_ids=True)  # the COCO API adds keys to these dicts
    two_classes = len(gt["categories"]) > 1
    gt_agnostic = class_agnostic(gt_coco, [])[0] if two_classes else None

    def side_job() -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        if two_classes:
            for p in coco_preds:
                p["category_id"] = 1
            out["agnostic"] = coco_bbox_metrics(gt_agnostic, coco_preds, copy_preds=False)
        if bootstrap and bootstrap > 0:
            out["bootstrap"] = bootstrap_metrics(
                data,
                n_resamples=int(bootstrap),
                seed=int(seed),
                piou_matches=m,
                piou_score_thresh=piou_score_thresh,
                froc_hit=froc_hit,
                froc_iou=froc_iou,
                with_malignancy=mal is not None,
                estimates={
                    "piou": piou["score"],
                    "cpm": fr["cpm"],
                    "image_auc": il["auc"],
                    "malignancy_auc": mal["auc"] if mal is not None else None,
                },
            )
        return out

    side = Beside(side_job, enabled=len(coco_preds) >= PARALLEL_MIN_DETECTIONS)
    if side.forked:
        coco = coco_bbox_metrics(gt_coco, coco_preds, copy_preds=False)
        side_out = side.result()
    else:
        coco = coco_bbox_metrics(gt_coco, coco_preds, copy_preds=False)
        side_out = side_job()
    metrics["bbox"] = coco["metrics"]
    pr_curves = dict(coco["pr_curves"])
    if "agnostic" in side_out:
        coco_a = side_out["agnostic"]
        metrics["bbox_agnostic"] = {k: v for k, v in coco_a["metrics"].items() if not k.startswith("AP-")}
        if "lesion" in coco_a["pr_curves"]:
            pr_curves["lesion (any class)"] = coco_a["pr_curves"]["lesion"]
    if "bootstrap" in side_out:
        metrics["bootstrap"] = side_out["bootstrap"]
        metrics["bootstrap"]["metrics"]["AP50"]["estimate"] = metrics["bbox"].get("AP50")
    mark("coco_and_bootstrap")

    # Plots
    plot_files: Dict[str, str] = {}
    if plots:
        from . import plots as P

        plot_files["pr_curves"] = P.plot_pr_curves(pr_curves, os.path.join(output_dir, "pr_curves.png"))
        plot_files["froc"] = P.plot_froc(
            froc_curve["fps_per_image"],
            froc_curve["sensitivity"],
            fr["fps_per_image"],
            fr["sensitivity"],
            os.path.join(output_dir, "froc.png"),
            hit_rule=_hit_rule_text(froc_hit, froc_iou),
            cpm=fr["cpm"],
            extended=fr["extended"],
        )
        rocs = {}
        if il_roc["fpr"]:
            rocs["lesion present vs absent"] = (il_roc["fpr"], il_roc["tpr"], il["auc"])
        if mal_roc is not None and mal_roc["fpr"]:
            rocs["malignant vs benign"] = (mal_roc["fpr"], mal_roc["tpr"], mal["auc"])
        plot_files["roc"] = P.plot_roc_curves(rocs, os.path.join(output_dir, "roc.png"))
        if mal is not None:
            cm = mal["confusion_matrix"]
            plot_files["confusion_matrix"] = P.plot_confusion_matrix(
                cm["counts"],
                cm["rows_truth"],
                cm["columns_predicted"],
                os.path.join(output_dir, "confusion_matrix.png"),
                title=f"Malignancy on lesion images (score >= {score_thresh:g})",
            )
        else:
            plot_files["confusion_matrix"] = P.plot_confusion_matrix(
                [[il["tn"], il["fp"]], [il["fn"], il["tp"]]],
                ["no lesion", "lesion"],
                ["no lesion", "lesion"],
                os.path.join(output_dir, "confusion_matrix.png"),
                title=f"Lesion present per image (top score >= {score_thresh:g})",
            )
        plot_files["piou_sweep"] = P.plot_piou_sweep(
            piou["sweep"], piou_score_thresh, piou["score"], os.path.join(output_dir, "piou_vs_score_thresh.png")
        )
        plot_files = {k: os.path.basename(v) for k, v in plot_files.items() if v}
        mark("plots")
    if by:
        metrics["subgroups"] = subgroup_tables(
            gt, data, by, n_resamples=int(bootstrap), seed=int(seed), source=gt_name,
            piou_score_thresh=piou_score_thresh, piou_iou_thresh=piou_iou_thresh, piou_topk=piou_topk,
            piou_class_aware=piou_class_aware, froc_hit=froc_hit, froc_iou=froc_iou)
        mark("subgroups")
    if operating_point is not None:
        metrics["operating_point"] = apply_threshold(operating_point, data)
    metrics["plots"] = plot_files
    metrics["warnings"] = warnings
    timing["read_and_check"] = round(timing["read_and_check"], 3)
    metrics["seconds"] = round(time.perf_counter() - t0, 3)
    metrics["timing"] = timing

    order = ["inputs", "piou", "bbox", "bbox_agnostic", "froc", "image_level", "malignancy", "bootstrap"]
    metrics = OrderedDict([(k, metrics[k]) for k in order if k in metrics] + [(k, v) for k, v in metrics.items() if k not in order])
    atomic_write_json(os.path.join(output_dir, "metrics.json"), metrics)
    atomic_write_text(os.path.join(output_dir, "report.md"), render_report(metrics, title=title))
    if html:
        if image_root is None and isinstance(gt_json, str):
            image_root = os.path.dirname(os.path.dirname(os.path.abspath(gt_json)))  # OUT/annotations/x.json
        write_html_report(output_dir, metrics, gt=gt, predictions=preds.to_coco(), image_root=image_root,
                          training_metrics=training_metrics, title=title)
    logger.info(
        "Evaluation written to %s: AP50=%s piou=%s CPM=%s",
        output_dir,
        fmt_value(metrics["bbox"].get("AP50"), 2),
        fmt_value(piou["score"]),
        fmt_value(fr["cpm"]),
    )
    return metrics


def _hit_rule_text(hit: str, iou: Optional[float]) -> str:
    return f"IoU >= {iou:g}" if hit == "iou" else "prediction centre inside the truth box"


def render_report(metrics: Dict[str, Any], title: Optional[str] = None) -> str:
    """Markdown report from the metrics dict (tables, thresholds, CIs, plot file names)."""
    inp = metrics["inputs"]
    out: List[str] = [f"# {title or 'Detection evaluation report'}\n"]
    out.append(
        f"- Ground truth: `{inp['ground_truth']}`: {inp['num_images']} images "
        f"({inp['num_lesion_images']} with lesions), {inp['num_truth_boxes']} truth boxes, "
        f"categories: {', '.join(inp['categories'])}\n"
        f"- Predictions: `{inp['predictions']}`: {inp['num_predictions']} detections scored, "
        f"{inp['num_predictions_ignored']} ignored\n"
    )
    if inp.get("num_ignore_regions"):
        out.append(
            f"- Ignore regions (COCO `iscrowd: 1`): {inp['num_ignore_regions']}, never counted as lesions; "
            f"{inp['num_predictions_in_ignore_regions']} detections inside ignore regions (matching no lesion at "
            "IoU 0.5, at least half their area inside) removed before penalized IoU, FROC and the image-level "
            "calls; COCO AP applies pycocotools' own crowd rule\n"
        )
    if metrics.get("warnings"):
        out.append("\n## Input problems\n")
        out.extend(f"- {w}\n" for w in metrics["warnings"])

    bbox = metrics["bbox"]
    out.append("\n## COCO box AP (percent)\n\n")
    cols = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    rows = [["all classes (mean)"] + [bbox.get(c) for c in cols]]
    if "bbox_agnostic" in metrics:
        rows.append(["lesion (class-agnostic)"] + [metrics["bbox_agnostic"].get(c) for c in cols])
    out.append(markdown_table(["classes"] + cols, rows, 2))
    per_class = [(k[3:], v) for k, v in bbox.items() if k.startswith("AP-")]
    if per_class:
        out.append("\nPer class AP (IoU 0.50:0.95):\n\n")
        out.append(markdown_table(["class", "AP"], per_class, 2))

    p = metrics["piou"]
    out.append("\n## Penalized IoU\n\n")
    out.append(
        f"Score threshold s = {p['score_thresh']:g}, IoU threshold t = {p['iou_thresh']:g}, "
        f"top-k = {p['topk']} per image, {'class-aware' if p.get('class_aware') else 'class-agnostic'}. "
        "score = sum(IoU of TPs) / (TP + FP + FN); images with no truth and no kept prediction "
        "(TN) are left out.\n\n"
    )
    out.append(
        markdown_table(
            ["score", "TP", "FP", "FN", "TN", "mean IoU of TPs"],
            [[p["score"], p["tp"], p["fp"], p["fn"], p["tn"], p["mean_iou_tp"]]],
        )
    )
    out.append(
        f"\nBest over the sweep s = 0.05 .. 0.95: **{fmt_value(p['best_score'])}** at s = {fmt_value(p['best_score_thresh'], 2)}.\n\n"
    )
    sw = p["sweep"]
    out.append(
        markdown_table(
            ["s", "score", "TP", "FP", "FN", "TN"],
            [[f"{s:.2f}", sc, tp, fp, fn, tn] for s, sc, tp, fp, fn, tn in zip(sw["score_thresh"], sw["score"], sw["tp"], sw["fp"], sw["fn"], sw["tn"])],
        )
    )

    fr = metrics["froc"]
    out.append("\n## FROC\n\n")
    out.append(
        f"Hit rule: {_hit_rule_text(fr['hit'], fr.get('iou_thresh'))} (`--froc-hit {fr['hit']}`), "
        "any class. Each truth box counts once; further hits on a found box are neither TP nor FP; "
        "a prediction hitting nothing is an FP. Sensitivity at a rate is the highest reached at an "
        f"average FP/image not above it. {fr['num_lesions']} lesions in {fr['num_images']} images.\n\n"
    )
    extended = fr.get("extended", [False] * len(fr["sensitivity"]))
    out.append(
        markdown_table(
            ["FP / image"] + [f"{r:g}" for r in fr["fps_per_image"]] + ["CPM"],
            [["sensitivity"] + [fmt_value(v) + ("*" if ext else "") for v, ext in zip(fr["sensitivity"], extended)]
             + [fmt_value(fr["cpm"]) + ("*" if any(extended) else "")]],
        )
    )
    if any(extended):
        rates = ", ".join(f"{r:g}" for r in fr["extended_rates"])
        out.append(
            f"\n\\* **Extended**: the curve ends at {fmt_value(fr.get('max_fps_per_image'))} FP/image before finding "
            f"every lesion (the model output no more boxes), so at {rates} FP/image the sensitivity is the curve's "
            "last value carried on (the usual FROC convention), and the CPM includes these rates. Lower-scoring "
            "detections might have found more: lower `MODEL.ROI_HEADS.SCORE_THRESH_TEST` or raise "
            "`TEST.DETECTIONS_PER_IMAGE` to measure them.\n"
        )

    il = metrics["image_level"]
    out.append("\n## Image level: lesion present vs absent\n\n")
    out.append(
        f"Top detection score per image (0 without detection); call 'lesion' at score >= {il['score_thresh']:g}. "
        f"{il['num_lesion_images']} lesion images, {il['num_normal_images']} normal images.\n\n"
    )
    out.append(
        markdown_table(
            ["ROC AUC", "sensitivity", "specificity", "PPV", "NPV", "TP", "FP", "TN", "FN"],
            [[il["auc"], il["sensitivity"], il["specificity"], il["ppv"], il["npv"], il["tp"], il["fp"], il["tn"], il["fn"]]],
        )
    )

    if "malignancy" in metrics:
        mal = metrics["malignancy"]
        out.append("\n## Malignant vs benign (lesion images)\n\n")
        out.append(
            "Malignancy score = top malignant detection score - top benign detection score (ROC AUC); "
            f"call = class of the top detection with score >= {mal['score_thresh']:g} "
            "('no detection' counts as not malignant).\n\n"
        )
        out.append(
            markdown_table(
                ["ROC AUC", "sensitivity", "specificity", "PPV", "NPV", "malignant", "benign"],
                [[mal["auc"], mal["sensitivity"], mal["specificity"], mal["ppv"], mal["npv"], mal["num_malignant"], mal["num_benign"]]],
            )
        )
        cm = mal["confusion_matrix"]
        out.append("\nConfusion matrix (rows: truth, columns: prediction):\n\n")
        out.append(markdown_table(["truth \\ predicted"] + cm["columns_predicted"], [[t] + r for t, r in zip(cm["rows_truth"], cm["counts"])]))

    if "bootstrap" in metrics:
        b = metrics["bootstrap"]
        out.append("\n## Bootstrap 95% confidence intervals\n\n")
        out.append(
            f"{b['n_resamples']} resamples of the images with replacement (seed {b['seed']}), percentile intervals.\n\n"
        )
        rows = [[name, v["estimate"], v["low"], v["high"]] for name, v in b["metrics"].items()]
        out.append(markdown_table(["metric", "estimate", "2.5%", "97.5%"], rows))

    if "operating_point" in metrics:
        out.append(render_operating_point(metrics["operating_point"]))
    if "subgroups" in metrics:
        out.append(render_subgroups(metrics["subgroups"]))
    if metrics.get("plots"):
        out.append("\n## Plots\n\n")
        captions = {
            "pr_curves": "Precision-recall curves",
            "froc": "FROC curve",
            "roc": "ROC curves",
            "confusion_matrix": "Confusion matrix",
            "piou_sweep": "Penalized IoU vs score threshold",
        }
        for key, fname in metrics["plots"].items():
            out.append(f"### {captions.get(key, key)}\n\n![{captions.get(key, key)}]({fname})\n\n")
    return "".join(out)
