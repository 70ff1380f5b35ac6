"""Several models on several datasets in one go: one table and one plot, with CIs.

Each model goes through the engine's own ``--eval-only`` path
(:func:`usdet.engine.trainer.evaluate_checkpoint`, the same setup as ``tools/train_net.py
--eval-only``) with ``DATASETS.TEST`` set to the requested datasets, so every cell of the table
has the full report (``<output>/<model>/inference/<dataset>/report.md``) behind it. One config
serves every model, but each model normalizes its input with the PIXEL_MEAN/STD its checkpoint
records (a ``busi`` and a ``mixed`` model each with its own training statistics); the table says
which. With a validation dataset the image-level operating point is chosen on it per model
(:mod:`usdet.evaluation.operating_point`) and applied to every dataset.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog

from usdet.engine.setup import check_datasets, default_run_setup
from usdet.engine.trainer import EVALUATED_WEIGHTS, evaluate_checkpoint
from usdet.evaluation.formatting import fmt_estimate as _cell, markdown_table
from usdet.evaluation.inputs import load_detection_data
from usdet.evaluation.operating_point import apply_threshold, choose_threshold
from usdet.utils.io import atomic_write_json, atomic_write_text

__all__ = ["TABLE_METRICS", "cross_evaluate", "render_cross_eval", "row_from_metrics"]

#: Table columns: (metrics.json estimate path, bootstrap key or None, label).
TABLE_METRICS = (
    (("bbox", "AP50"), "AP50", "AP50"),
    (("bbox", "AP"), None, "AP"),
    (("piou", "score"), "piou", "penalized IoU"),
    (("froc", "cpm"), "cpm", "CPM"),
    (("image_level", "auc"), "image_auc", "image AUC"),
)


def row_from_metrics(m: Dict[str, Any]) -> "OrderedDict[str, Any]":
    """``{label: {"estimate", "low"?, "high"?}}`` of one report's ``metrics.json``."""
    boot = m.get("bootstrap", {}).get("metrics", {})
    out: "OrderedDict[str, Any]" = OrderedDict()
    for (section, key), bkey, label in TABLE_METRICS:
        v = {"estimate": m.get(section, {}).get(key)}
        if bkey and bkey in boot:
            v.update(low=boot[bkey]["low"], high=boot[bkey]["high"])
        out[label] = v
    return out


def _predictions_dir(run_dir: str, dataset: str) -> str:
    return os.path.join(run_dir, "inference", dataset)


def cross_evaluate(
    cfg: CfgNode,
    weights: Mapping[str, str],
    datasets: Sequence[str],
    output_dir: str,
    *,
    val_dataset: Optional[str] = None,
    target_sensitivity: float = 0.95,
    plots: bool = True,
    config_file: str = "",
) -> Dict[str, Any]:
    """Evaluate each ``{name: weights file}`` on each registered dataset; write
    ``cross_eval.json``, ``cross_eval.md`` and ``cross_eval.png`` into ``output_dir``.

    ``cfg`` (e.g. ``usdet.engine.setup.build_config``) is every model's config; ``MODEL.WEIGHTS``,
    ``OUTPUT_DIR`` and ``DATASETS.TEST`` are set per model, ``TEST.BOOTSTRAP`` sets the resamples
    of each report's CIs. ``config_file`` only names the config in the report.
    """
    if not weights:
        raise ValueError("no model given (--weights)")
    if not datasets:
        raise ValueError("no dataset given (--datasets)")
    for name, w in weights.items():
        if not os.path.isfile(w):
            raise FileNotFoundError(f"{w}: weights file of model {name!r} not found")
    evaluated = list(dict.fromkeys(list(datasets) + ([val_dataset] if val_dataset else [])))
    result: "OrderedDict[str, Any]" = OrderedDict()
    result["config_file"] = config_file or None
    result["models"] = {k: v for k, v in weights.items()}
    result["datasets"] = list(datasets)
    result["val_dataset"] = val_dataset
    # each model's own PIXEL_MEAN/STD (its checkpoint's record where it has one), as evaluated
    result["normalization"] = OrderedDict()
    rows: List[Dict[str, Any]] = []
    for name, w in weights.items():
        run_dir = os.path.join(output_dir, name)
        run_cfg = cfg.clone()
        run_cfg.defrost()
        run_cfg.MODEL.WEIGHTS, run_cfg.OUTPUT_DIR, run_cfg.DATASETS.TEST = w, run_dir, tuple(evaluated)
        run_cfg.freeze()
        default_run_setup(run_cfg, eval_only=True)  # log.txt and config_eval.yaml in run_dir, seeding
        check_datasets(run_cfg, eval_only=True)
        evaluate_checkpoint(run_cfg)
        with open(os.path.join(run_dir, "inference", EVALUATED_WEIGHTS), encoding="utf-8") as fh:
            result["normalization"][name] = json.load(fh)["normalization"]
        op = None
        if val_dataset:
            gt = MetadataCatalog.get(val_dataset).get("json_file")
            preds = os.path.join(_predictions_dir(run_dir, val_dataset), "coco_instances_results.json")
            op = choose_threshold(load_detection_data(gt, preds)[1], target_sensitivity)
        for ds in datasets:
            folder = _predictions_dir(run_dir, ds)
            with open(os.path.join(folder, "metrics.json"), encoding="utf-8") as fh:
                m = json.load(fh)
            row: Dict[str, Any] = {
                "model": name, "dataset": ds,
                "num_images": m["inputs"]["num_images"], "num_lesion_images": m["inputs"]["num_lesion_images"],
                "metrics": row_from_metrics(m),
                "report": os.path.relpath(os.path.join(folder, "report.md"), output_dir),
                "predictions": os.path.relpath(os.path.join(folder, "coco_instances_results.json"), output_dir),
            }
            if op is not None:
                gt = MetadataCatalog.get(ds).get("json_file")
                data = load_detection_data(gt, os.path.join(folder, "coco_instances_results.json"))[1]
                row["operating_point"] = {"score_thresh": op["score_thresh"],
                                          "target_sensitivity": op["target_sensitivity"],
                                          "val": op["val"], "test": apply_threshold(op, data)["test"]}
            rows.append(row)
    result["rows"] = rows
    os.makedirs(output_dir, exist_ok=True)
    if plots:
        from usdet.evaluation.interval_plots import plot_intervals  # matplotlib: only when plotting

        panels: Dict[str, list] = OrderedDict()
        for _, bkey, label in TABLE_METRICS:
            if bkey:
                panels[label] = [(r["dataset"], r["model"], r["metrics"][label]["estimate"],
                                  r["metrics"][label].get("low", float("nan")),
                                  r["metrics"][label].get("high", float("nan"))) for r in rows]
        plot_intervals(panels, os.path.join(output_dir, "cross_eval.png"), "Models x datasets (95% bootstrap CI)")
        result["plot"] = "cross_eval.png"
    atomic_write_json(os.path.join(output_dir, "cross_eval.json"), result)
    atomic_write_text(os.path.join(output_dir, "cross_eval.md"), render_cross_eval(result))
    return result


def render_cross_eval(r: Dict[str, Any]) -> str:
    """Markdown table: one row per model and dataset."""
    labels = [label for _, _, label in TABLE_METRICS]
    with_op = any("operating_point" in row for row in r["rows"])
    header = ["model", "dataset", "images", "lesion images"] + labels
    if with_op:
        header += ["threshold", "sensitivity", "specificity"]
    config = f"Config `{r['config_file']}`" if r.get("config_file") else "One config for every model"
    out = [f"# Cross-dataset evaluation\n\n{config}. AP in percent; 95% bootstrap intervals "
           "over images in brackets (AP has none). Each cell's full report: `<model>/inference/<dataset>/report.md`.\n"]
    if with_op:
        out.append(f"Operating point per model: highest score threshold reaching image-level sensitivity "
                   f"{r['rows'][0]['operating_point']['target_sensitivity']:g} on `{r['val_dataset']}`; "
                   "sensitivity and specificity at it with Wilson 95% intervals.\n")
    norms = r.get("normalization") or {}
    if norms:
        out.append("\nInput normalization per model (0-255, the config's channel order; each checkpoint's own where it "
                   "records one):\n\n")
        for name, n in norms.items():
            out.append(f"- {name}: " + ("unknown (the model has no pixel_mean)\n" if not n else
                       f"PIXEL_MEAN {[round(v, 4) for v in n['pixel_mean']]} PIXEL_STD "
                       f"{[round(v, 4) for v in n['pixel_std']]} (the {n['source']}'s)\n"))
    rows = []
    for row in r["rows"]:
        cells = [row["model"], row["dataset"], str(row["num_images"]), str(row["num_lesion_images"])]
        cells += [_cell(row["metrics"][k], 1 if k.startswith("AP") else 3) for k in labels]
        if with_op:
            o = row["operating_point"]
            t = o["test"]
            cells += [f"{o['score_thresh']:.3f}",
                      _cell({"estimate": t["sensitivity"], **t["sensitivity_ci"]}),
                      _cell({"estimate": t["specificity"], **t["specificity_ci"]})]
        rows.append(cells)
    out.append("\n" + markdown_table(header, rows))
    if r.get("plot"):
        out.append(f"\n![models x datasets]({r['plot']})\n")
    return "".join(out)
