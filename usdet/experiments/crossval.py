"""K-fold cross-validation of a training recipe on a converted dataset.

With ~100 test images one split cannot rank two recipes; K folds test every image once. The
plan (folds, seed, dataset) is fixed in ``<output>/cv.json``; each fold gets its annotations in
``<output>/folds/fold<k>/annotations/{train,val,test}.json`` (the converted dataset's images,
all splits pooled, split by :func:`usdet.data.split.kfold_split`: groups never straddle, each
image is tested once; the image folders are symbolic links, no copies) and is a normal
``tools/train_net.py`` run with its own ``OUTPUT_DIR`` (``<output>/fold<k>``), then an
``--eval-only`` run of its best checkpoint on its test fold. Everything is resumable: a finished
fold (its test ``metrics.json``) is skipped, an unfinished one continues with ``--resume`` from
its last checkpoint. The out-of-fold predictions are pooled (``pooled_gt.json``,
``pooled_predictions.json``, usable by ``tools/compare_models.py``) and scored with bootstrap
CIs; per-fold metrics get mean and sd.
"""
from __future__ import annotations

import glob
import json
import os
import shlex
import subprocess
import sys
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from usdet.data.register import register_all_usdet_datasets
from usdet.data.split import kfold_split
from usdet.evaluation.formatting import fmt_estimate, fmt_value as _fmt
from usdet.evaluation.report import evaluate_predictions
from usdet.utils.io import atomic_write_json, atomic_write_text

__all__ = ["FOLD_METRICS", "read_converted_dataset", "write_folds", "fold_commands", "fold_overrides",
           "run_cross_validation", "summarize_folds", "print_commands"]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")

#: (label, metrics.json section, key, bootstrap key)
FOLD_METRICS = (
    ("AP50", "bbox", "AP50", "AP50"),
    ("AP", "bbox", "AP", None),
    ("penalized IoU", "piou", "score", "piou"),
    ("CPM", "froc", "cpm", "cpm"),
    ("image AUC", "image_level", "auc", "image_auc"),
)


def read_converted_dataset(root: str) -> Dict[str, Any]:
    """All images of ``root/annotations/*.json`` as one COCO dict, images renumbered 1..N by file name.

    Raises ``ValueError`` naming the file when the splits disagree on categories or an image
    appears in two split files.
    """
    files = sorted(glob.glob(os.path.join(root, "annotations", "*.json")))
    if not files:
        raise FileNotFoundError(f"{root}: no annotations/*.json (convert the dataset first)")
    categories = None
    images: Dict[str, Dict[str, Any]] = {}
    anns: Dict[str, List[Dict[str, Any]]] = {}
    for f in files:
        with open(f, encoding="utf-8") as fh:
            doc = json.load(fh)
        if not isinstance(doc, dict) or not {"images", "annotations", "categories"} <= set(doc):
            raise ValueError(f"{f}: not a COCO file (needs images, annotations, categories)")
        cats = [{"id": c["id"], "name": c["name"]} for c in doc["categories"]]
        if categories is None:
            categories = cats
        elif cats != categories:
            raise ValueError(f"{f}: categories {cats} differ from the other splits' {categories}")
        by_id = {}
        for im in doc["images"]:
            name = im["file_name"]
            if name in images:
                raise ValueError(f"{f}: image {name} is also in another split file")
            images[name] = im
            anns[name] = []
            by_id[im["id"]] = name
        for a in doc["annotations"]:
            if a.get("image_id") in by_id:
                anns[by_id[a["image_id"]]].append(a)
    out_images, out_anns = [], []
    for k, name in enumerate(sorted(images), start=1):
        out_images.append(dict(images[name], id=k))
        for a in anns[name]:
            out_anns.append(dict(a, image_id=k, id=len(out_anns) + 1))
    return {"images": out_images, "annotations": out_anns, "categories": categories or []}


def _group_and_label(im: Dict[str, Any], has_lesion: bool) -> tuple:
    group = im.get("group") or im.get("patient") or im["file_name"]
    label = im.get("label") or ("lesion" if has_lesion else "normal")
    return str(group), str(label)


def write_folds(root: str, output_dir: str, folds: int, seed: int = 0, val_fraction: float = 0.15) -> Dict[str, Any]:
    """Write the pooled ground truth and each fold's train/val/test annotations; return the plan.

    A plan already in ``output_dir/cv.json`` must match (same dataset, folds, seed), else
    ``ValueError``: a resumed CV never mixes two partitions.
    """
    root = os.path.abspath(root)
    plan = OrderedDict(dataset_root=root, folds=int(folds), seed=int(seed), val_fraction=float(val_fraction))
    plan_file = os.path.join(output_dir, "cv.json")
    if os.path.isfile(plan_file):
        with open(plan_file, encoding="utf-8") as fh:
            old = json.load(fh)
        if {k: old.get(k) for k in plan} != dict(plan):
            raise ValueError(f"{plan_file}: this output folder holds a CV with {dict((k, old.get(k)) for k in plan)}, "
                             f"not {dict(plan)}; use another --output")
    gt = read_converted_dataset(root)
    lesion = {a["image_id"] for a in gt["annotations"] if not a.get("iscrowd", 0)}
    keys = [im["file_name"] for im in gt["images"]]
    gl = [_group_and_label(im, im["id"] in lesion) for im in gt["images"]]
    os.makedirs(output_dir, exist_ok=True)
    atomic_write_json(os.path.join(output_dir, "pooled_gt.json"), gt)
    tops = sorted({k.split("/")[0] for k in keys})  # folders (or files) at the dataset's top level
    if "annotations" in tops:  # linking it would write the folds into the dataset itself
        raise ValueError(f"{root}: images under annotations/ cannot be linked into the folds; move them")
    fold_sizes = []
    for k in range(folds):
        split = kfold_split(keys, [g for g, _ in gl], [lab for _, lab in gl], folds, k, val_fraction, seed)
        fdir = os.path.join(output_dir, "folds", f"fold{k}")
        for top in tops:  # the images stay where they are: link their folders
            link = os.path.join(fdir, top)
            if not os.path.lexists(link):
                os.makedirs(fdir, exist_ok=True)
                os.symlink(os.path.join(root, top), link)
        sizes = {}
        for part in ("train", "val", "test"):
            ids = {im["id"] for im in gt["images"] if split[im["file_name"]] == part}
            doc = dict(gt, images=[im for im in gt["images"] if im["id"] in ids],
                       annotations=[a for a in gt["annotations"] if a["image_id"] in ids])
            atomic_write_json(os.path.join(fdir, "annotations", f"{part}.json"), doc)
            sizes[part] = len(ids)
        fold_sizes.append(sizes)
    plan["num_images"] = len(keys)
    plan["fold_sizes"] = fold_sizes
    atomic_write_json(plan_file, plan)
    return plan


def _fold_names(k: int) -> Dict[str, str]:
    return {part: f"fold{k}_{part}" for part in ("train", "val", "test")}


def _fold_weights(run_dir: str) -> str:
    best = os.path.join(run_dir, "model_best.pth")
    return best if os.path.isfile(best) else os.path.join(run_dir, "model_final.pth")


def fold_overrides(output_dir: str, k: int, opts: Sequence[str] = (), bootstrap: int = 1000,
                   weights: Optional[str] = None) -> Dict[str, List[str]]:
    """The ``KEY VALUE`` config overrides of fold ``k``'s ``train`` run and its ``test`` evaluation
    (of ``weights``, default the fold's best checkpoint); ``opts`` come first, the fold's keys win."""
    n = _fold_names(k)
    run_dir = os.path.join(output_dir, f"fold{k}")
    train = [*opts, "DATASETS.TRAIN", f"('{n['train']}',)", "DATASETS.TEST", f"('{n['val']}',)", "OUTPUT_DIR", run_dir]
    test = ["TEST.BOOTSTRAP", str(int(bootstrap)), *opts, "MODEL.WEIGHTS", weights or _fold_weights(run_dir),
            "DATASETS.TEST", f"('{n['test']}',)", "OUTPUT_DIR", run_dir]
    return {"train": train, "test": test}


def fold_commands(config_file: str, output_dir: str, k: int, opts: Sequence[str] = (), bootstrap: int = 1000,
                  weights: Optional[str] = None) -> Dict[str, List[str]]:
    """The ``train`` (``--resume``) and ``test`` (``--eval-only``) ``tools/train_net.py`` command lines of
    fold ``k``: what the subprocesses and ``--print-commands`` run (:func:`fold_overrides`)."""
    o = fold_overrides(output_dir, k, opts, bootstrap, weights)
    base = [sys.executable, TRAIN_NET, "--config-file", config_file]
    return {"train": base + ["--resume", *o["train"]], "test": base + ["--eval-only", *o["test"]]}


def _env(output_dir: str) -> Dict[str, str]:
    env = dict(os.environ)
    env["USDET_DATASETS"] = os.path.join(output_dir, "folds")
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _test_dir(output_dir: str, k: int) -> str:
    return os.path.join(output_dir, f"fold{k}", "inference", _fold_names(k)["test"])


def print_commands(config_file: str, output_dir: str, folds: int, opts: Sequence[str] = (),
                   bootstrap: int = 1000) -> str:
    """Shell lines that run every fold (train, then test of its best checkpoint), e.g. on a cluster.
    Each fold's pair is independent of the others; the summary is the same tool without
    ``--print-commands`` once they have run (finished folds are skipped)."""
    output_dir = os.path.abspath(output_dir)
    lines = [f"export USDET_DATASETS={shlex.quote(os.path.join(output_dir, 'folds'))}",
             f"export PYTHONPATH={shlex.quote(REPO)}${{PYTHONPATH:+:$PYTHONPATH}}"]
    for k in range(folds):
        c = fold_commands(config_file, output_dir, k, opts, bootstrap, weights="$W")
        run_dir = shlex.quote(os.path.join(output_dir, f"fold{k}"))
        lines.append(f"# fold {k}")
        lines.append(" ".join(shlex.quote(x) for x in c["train"]))
        lines.append(f"W={run_dir}/model_best.pth; [ -f \"$W\" ] || W={run_dir}/model_final.pth")
        lines.append(" ".join(shlex.quote(x) if x != "$W" else '"$W"' for x in c["test"]))
    return "\n".join(lines) + "\n"


def _run_in_process(config_file: str, overrides: Sequence[str], step: str, output_dir: str) -> None:
    """Fold ``step`` (``train`` or ``test``) through the engine in this process, as train_net would run it."""
    from usdet.engine.setup import build_config, check_datasets, default_run_setup
    from usdet.engine.trainer import Trainer, TrainingDivergedError, evaluate_checkpoint

    register_all_usdet_datasets(os.path.join(output_dir, "folds"))
    test = step == "test"
    cfg = build_config(config_file, overrides)
    cfg.freeze()
    default_run_setup(cfg, eval_only=test)
    check_datasets(cfg, eval_only=test)
    if test:
        evaluate_checkpoint(cfg)
        return
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    try:
        trainer.train()
    except TrainingDivergedError as e:
        raise RuntimeError(f"fold training in {cfg.OUTPUT_DIR} diverged: {e}") from None


def _run(cmd: List[str], env: Dict[str, str], log: str) -> None:
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "a", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(shlex.quote(x) for x in cmd) + "\n")
        fh.flush()
        rc = subprocess.call(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    if rc != 0:
        with open(log, encoding="utf-8", errors="replace") as fh:
            tail = fh.read()[-2000:]
        raise RuntimeError(f"{cmd[1]} exited with {rc}; log {log}:\n{tail}")


def run_cross_validation(
    config_file: str,
    dataset_root: str,
    output_dir: str,
    folds: int = 5,
    *,
    seed: int = 0,
    val_fraction: float = 0.15,
    opts: Sequence[str] = (),
    bootstrap: int = 1000,
    plots: bool = True,
    in_process: bool = False,
) -> Dict[str, Any]:
    """Write the folds, run every unfinished fold (train, test), then :func:`summarize_folds`.

    Each run is a ``tools/train_net.py`` subprocess (its output in ``fold<k>/train_net_output.txt``);
    ``in_process`` runs the same config through the engine in this process instead (no start-up per run).
    """
    from tqdm import tqdm

    output_dir = os.path.abspath(output_dir)
    write_folds(dataset_root, output_dir, folds, seed, val_fraction)
    env = _env(output_dir)
    for k in tqdm(range(folds), desc="cross-validation folds", unit="fold"):
        if os.path.isfile(os.path.join(_test_dir(output_dir, k), "metrics.json")):
            continue  # finished earlier
        log = os.path.join(output_dir, f"fold{k}", "train_net_output.txt")
        run_dir = os.path.join(output_dir, f"fold{k}")
        cmds = [] if os.path.isfile(os.path.join(run_dir, "model_final.pth")) else ["train"]
        for step in cmds + ["test"]:
            if in_process:
                _run_in_process(config_file, fold_overrides(output_dir, k, opts, bootstrap)[step], step, output_dir)
            else:
                _run(fold_commands(config_file, output_dir, k, opts, bootstrap)[step], env, log)
    return summarize_folds(output_dir, folds, bootstrap=bootstrap, seed=seed, plots=plots)


def summarize_folds(output_dir: str, folds: int, *, bootstrap: int = 1000, seed: int = 0,
                    plots: bool = True) -> Dict[str, Any]:
    """Per-fold test metrics, mean and sd, and the pooled out-of-fold predictions scored with CIs.

    Writes ``pooled_predictions.json``, ``pooled/`` (the full report), ``cv_summary.{json,md,png}``.
    """
    per_fold, pooled = [], []
    for k in range(folds):
        d = _test_dir(output_dir, k)
        with open(os.path.join(d, "metrics.json"), encoding="utf-8") as fh:
            m = json.load(fh)
        with open(os.path.join(d, "coco_instances_results.json"), encoding="utf-8") as fh:
            pooled.extend(json.load(fh))
        per_fold.append({"fold": k, "num_images": m["inputs"]["num_images"],
                         "num_lesion_images": m["inputs"]["num_lesion_images"],
                         "metrics": {label: m[sec].get(key) for label, sec, key, _ in FOLD_METRICS}})
    atomic_write_json(os.path.join(output_dir, "pooled_predictions.json"), pooled)
    pm = evaluate_predictions(os.path.join(output_dir, "pooled_gt.json"),
                              os.path.join(output_dir, "pooled_predictions.json"),
                              os.path.join(output_dir, "pooled"), bootstrap=bootstrap, seed=seed, plots=plots,
                              title=f"Pooled out-of-fold predictions ({folds} folds)")
    summary: "OrderedDict[str, Any]" = OrderedDict(folds=folds, per_fold=per_fold)
    stats, pooled_m = OrderedDict(), OrderedDict()
    boot = pm.get("bootstrap", {}).get("metrics", {})
    for label, sec, key, bkey in FOLD_METRICS:
        v = np.array([f["metrics"][label] for f in per_fold], dtype=np.float64)
        ok = v[np.isfinite(v)]
        stats[label] = {"mean": float(ok.mean()) if ok.size else float("nan"),
                        "sd": float(ok.std(ddof=1)) if ok.size > 1 else float("nan"), "n_folds": int(ok.size)}
        pooled_m[label] = {"estimate": pm[sec].get(key)}
        if bkey and bkey in boot:
            pooled_m[label].update(low=boot[bkey]["low"], high=boot[bkey]["high"])
    summary["mean_sd"] = stats
    summary["pooled"] = {"num_images": pm["inputs"]["num_images"], "metrics": pooled_m,
                         "ground_truth": "pooled_gt.json", "predictions": "pooled_predictions.json",
                         "report": "pooled/report.md"}
    if plots:
        from usdet.evaluation.interval_plots import plot_intervals  # matplotlib: only when plotting

        panels = OrderedDict()
        for label, _, _, _ in FOLD_METRICS:
            rows = [(f"fold {f['fold']}", "fold", f["metrics"][label], float("nan"), float("nan")) for f in per_fold]
            s = stats[label]
            rows.append(("mean ± sd", "mean ± sd", s["mean"], s["mean"] - s["sd"], s["mean"] + s["sd"]))
            p = pooled_m[label]
            rows.append(("pooled", "pooled (95% CI)", p["estimate"], p.get("low", float("nan")),
                         p.get("high", float("nan"))))
            panels[label] = rows
        plot_intervals(panels, os.path.join(output_dir, "cv_summary.png"), f"{folds}-fold cross-validation (test folds)")
        summary["plot"] = "cv_summary.png"
    atomic_write_json(os.path.join(output_dir, "cv_summary.json"), summary)
    atomic_write_text(os.path.join(output_dir, "cv_summary.md"), render_cv_summary(summary))
    return summary


def render_cv_summary(s: Dict[str, Any]) -> str:
    """Markdown: per-fold rows, mean ± sd, pooled with 95% bootstrap CIs."""
    labels = [label for label, _, _, _ in FOLD_METRICS]

    def d(label: str) -> int:
        return 1 if label.startswith("AP") else 3

    out = [f"# {s['folds']}-fold cross-validation\n\n",
           "Each fold's best checkpoint (`model_best.pth`, else `model_final.pth`) on its test fold. "
           "Pooled = all out-of-fold predictions scored together (`pooled_gt.json`, `pooled_predictions.json`; "
           "usable by `tools/compare_models.py`), with 95% bootstrap intervals over images.\n\n"]
    header = ["", "images", "lesion images"] + labels
    out.append("| " + " | ".join(header) + " |\n|" + "|".join("---" for _ in header) + "|\n")
    for f in s["per_fold"]:
        out.append("| " + " | ".join([f"fold {f['fold']}", str(f["num_images"]), str(f["num_lesion_images"])]
                                     + [_fmt(f["metrics"][lab], d(lab)) for lab in labels]) + " |\n")
    out.append("| mean ± sd | | | " + " | ".join(
        f"{_fmt(s['mean_sd'][lab]['mean'], d(lab))} ± {_fmt(s['mean_sd'][lab]['sd'], d(lab))}" for lab in labels) + " |\n")
    cells = [fmt_estimate(s["pooled"]["metrics"][lab], d(lab)) for lab in labels]
    out.append(f"| pooled | {s['pooled']['num_images']} | | " + " | ".join(cells) + " |\n")
    if s.get("plot"):
        out.append(f"\n![folds]({s['plot']})\n")
    return "".join(out)

