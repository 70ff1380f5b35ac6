#!/usr/bin/env python
"""The peer, run by the project: Ultralytics YOLOv8n from scratch on usdet's own BUSI split.

  python benchmarks/peer_yolo.py --dataset-root datasets/busi --budget-min 69 --imgsz 416 --batch 16 \
      [--usdet-pred output/busi_recipe_cpu/test/inference/busi_test/coco_instances_results.json]

1. Ultralytics lives in its own virtual environment, ``benchmarks/.venv-peer`` (git-ignored),
   created here with pip (``ultralytics`` from PyPI); torch and torchvision are the machine's
   (those of the Python running this script, made visible to the peer's venv by a ``.pth``
   file, so nothing is downloaded twice). It is never a usdet dependency.
2. usdet's converted split (``annotations/{train,val,test}.json``) becomes a YOLO dataset in a
   temporary folder (images linked, one label file per image, lesion-free images with empty
   files = background).
3. ``yolov8n.yaml`` (architecture only: no downloaded weights, ``pretrained=False``) trains for
   ``--budget-min`` minutes of wall clock (Ultralytics' ``time`` argument), CPU unless
   ``--device``; plots are off (they download a font) and ``YOLO_OFFLINE`` is set, AMP off
   (``benchmarks/contest.py`` turns it on for a GPU contest when usdet's recipe uses AMP).
   On CPU it gets ``--threads`` torch threads (default: all cores, as usdet's training gets;
   Ultralytics alone would use ``cpu_count - 1``, one core of two on a 2-core machine).
4. Its last/best weights predict the test split one image at a time (``--conf`` 0.001, up to
   ``--max-det`` 100 boxes), written as COCO
   results, scored by usdet's own evaluator (``tools/evaluate_json.py``'s code) and, with
   ``--usdet-pred``, compared with usdet's predictions by ``compare_models``.

Results: ``benchmarks/results/peer_yolo.json`` (``--result-name``) and the reports under
``--output``. Not part of ``make bench``/``make test``: the measurement is a 69-minute run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, write_result  # noqa: E402

PEER_VENV = os.path.join(REPO, "benchmarks", ".venv-peer")
ULTRALYTICS = "ultralytics==8.4.190"
#: Environment of every peer process: no network look-ups, no settings sync, no downloads.
OFFLINE_ENV = {"YOLO_OFFLINE": "1", "YOLO_VERBOSE": "True",
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}


#: What the GPU machine (no registry; torch, OpenCV, matplotlib, ... already there) must be carried:
#: benchmarks/prepare_gpu_carry.sh downloads these wheels. Not polars (its runtime is a 54 MB
#: wheel, too large to carry): DRIVER reads results.csv without it.
OFFLINE_WHEELS = (ULTRALYTICS, "ultralytics-thop==2.2.3")


def peer_python(venv: str = PEER_VENV, wheels: "str | None" = None) -> str:
    """The peer venv's Python, creating the venv and installing Ultralytics on first use.

    ``wheels``: a folder of wheels (``OFFLINE_WHEELS``) installed without their dependencies and
    without a registry, for machines that reach none (the GPU machine); else pip installs
    ``ULTRALYTICS`` from PyPI with its dependencies.
    """
    py = os.path.join(venv, "bin", "python")
    if os.path.isfile(os.path.join(venv, ".peer-ready")):
        return py
    import torch

    if not os.path.isfile(py):
        subprocess.check_call([sys.executable, "-m", "venv", *(["--without-pip"] if wheels else []), venv])
    site = subprocess.check_output([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   text=True).strip()
    # The machine's torch: the site-packages that holds the running interpreter's torch, appended
    # to the peer's path (the peer's own packages come first).
    with open(os.path.join(site, "_machine_torch.pth"), "w") as fh:
        fh.write(os.path.dirname(os.path.dirname(torch.__file__)) + "\n")
    if wheels:
        files = sorted(os.path.join(wheels, f) for f in os.listdir(wheels) if f.endswith(".whl"))
        if not any(os.path.basename(f).startswith("ultralytics-") for f in files):
            raise SystemExit(f"{wheels}: no ultralytics wheel (make them with benchmarks/prepare_gpu_carry.sh)")
        # this interpreter's pip writes into the peer's site-packages (the venv has no pip of its own)
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                               "--upgrade", "--target", site, *files])
    else:
        subprocess.check_call([py, "-m", "pip", "install", "-q", ULTRALYTICS])
    env = dict(os.environ, **OFFLINE_ENV, YOLO_CONFIG_DIR=os.path.join(venv, "yolo_config"))
    subprocess.check_call([py, "-c", "import ultralytics, torch; print('peer:', ultralytics.__version__, torch.__version__)"],
                          env=env)
    open(os.path.join(venv, ".peer-ready"), "w").close()
    return py


def coco_to_yolo(dataset_root: str, out: str, splits=("train", "val", "test"), max_images: int = 0) -> Dict[str, Any]:
    """usdet's converted COCO split as an Ultralytics dataset in ``out``; returns its description.

    ``max_images`` > 0 keeps the first that many images of each split (smoke runs); the test
    ground truth is then written beside the dataset (``test_gt.json``) so both are scored alike.
    """
    info: Dict[str, Any] = {"splits": {}}
    names = None
    for split in splits:
        with open(os.path.join(dataset_root, "annotations", f"{split}.json"), encoding="utf-8") as fh:
            coco = json.load(fh)
        if max_images > 0:
            coco["images"] = sorted(coco["images"], key=lambda im: im["id"])[:max_images]
            keep = {im["id"] for im in coco["images"]}
            coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
        cats = sorted(coco["categories"], key=lambda c: c["id"])
        if names is None:
            names = [c["name"] for c in cats]
        cls = {c["id"]: i for i, c in enumerate(cats)}
        by_img: Dict[Any, List[Dict[str, Any]]] = {im["id"]: [] for im in coco["images"]}
        for a in coco["annotations"]:
            if not a.get("iscrowd", 0) and a["image_id"] in by_img:
                by_img[a["image_id"]].append(a)
        img_dir = os.path.join(out, "images", split)
        lab_dir = os.path.join(out, "labels", split)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(lab_dir, exist_ok=True)
        files = {}
        for im in coco["images"]:
            src = os.path.abspath(os.path.join(dataset_root, im["file_name"]))
            stem = f"{im['id']}"
            dst = os.path.join(img_dir, stem + os.path.splitext(src)[1])
            if not os.path.lexists(dst):
                os.symlink(src, dst)
            w, h = float(im["width"]), float(im["height"])
            lines = []
            for a in by_img[im["id"]]:
                x, y, bw, bh = a["bbox"]
                lines.append(f"{cls[a['category_id']]} {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} "
                             f"{bw / w:.6f} {bh / h:.6f}")
            with open(os.path.join(lab_dir, stem + ".txt"), "w") as fh:
                fh.write("\n".join(lines) + ("\n" if lines else ""))
            files[os.path.basename(dst)] = im["id"]
        gt = os.path.join(dataset_root, "annotations", f"{split}.json")
        if max_images > 0:
            gt = os.path.join(out, f"{split}_gt.json")
            with open(gt, "w") as fh:
                json.dump(coco, fh)
        info["splits"][split] = {"images": len(coco["images"]), "files": files, "gt": gt}
    info["names"] = names
    info["category_ids"] = [c["id"] for c in cats]
    yaml_path = os.path.join(out, "data.yaml")
    with open(yaml_path, "w") as fh:
        fh.write(f"path: {out}\ntrain: images/train\nval: images/val\ntest: images/test\n")
        fh.write("names:\n" + "".join(f"  {i}: {n}\n" for i, n in enumerate(names)))
    info["yaml"] = yaml_path
    return info


#: Runs inside the peer venv: train from the architecture yaml, then predict each split one image
#: at a time (batch 1, timed: the inference throughput) with the stated test-time caps.
DRIVER = r'''
import json, os, sys, time
args = json.loads(sys.argv[1])
from ultralytics import YOLO
import ultralytics.utils.torch_utils as torch_utils
if args["threads"]:  # Ultralytics trains on cpu_count - 1 threads (1 of 2 cores): give it what usdet gets
    torch_utils.NUM_THREADS = args["threads"]
if args.get("select") == "AP":  # best.pt by val mAP50-95 alone (Ultralytics: 0.9 mAP50-95 + 0.1 mAP50)
    import ultralytics.utils.metrics as um
    um.Metric.fitness = lambda self: float(self.mean_results()[3])
import ultralytics.engine.trainer as ut
if args.get("amp"):  # its AMP check loads downloaded yolo26n.pt weights: offline it would turn AMP off
    ut.check_amp = lambda *a, **k: True
try:
    import polars  # noqa: F401
except ImportError:  # the GPU carry has no polars: read results.csv (checkpoint metadata) with csv
    import csv
    def _read_results_csv(self):
        try:
            with open(self.csv, newline="") as fh:
                rows = list(csv.DictReader(fh))
        except OSError:
            return {}
        cols = {}
        for row in rows:
            for k, v in row.items():
                try:
                    v = float(v)
                except (TypeError, ValueError):
                    pass
                cols.setdefault(k.strip(), []).append(v)
        return cols
    ut.BaseTrainer.read_results_csv = _read_results_csv
t0 = time.time()
model = YOLO("yolov8n.yaml")
model.train(data=args["yaml"], time=args["hours"], epochs=args["epochs"], imgsz=args["imgsz"], batch=args["batch"],
            device=args["device"], workers=args["workers"], pretrained=False, amp=bool(args.get("amp")), plots=False,
            project=args["project"], name="train", exist_ok=True, seed=args["seed"], deterministic=True,
            val=True, verbose=False)
train_s = time.time() - t0
wdir = os.path.join(args["project"], "train", "weights")
weights = os.path.join(wdir, "best.pt") if os.path.isfile(os.path.join(wdir, "best.pt")) else os.path.join(wdir, "last.pt")
model = YOLO(weights)
detections, infer = {}, {}
for split, folder in args["predict"].items():
    files = sorted(os.listdir(folder))
    out = []
    model.predict(os.path.join(folder, files[0]), conf=args["conf"], max_det=args["max_det"], imgsz=args["imgsz"],
                  device=args["device"], verbose=False)  # warm-up
    t1 = time.time()
    for f in files:
        r = model.predict(os.path.join(folder, f), conf=args["conf"], max_det=args["max_det"], imgsz=args["imgsz"],
                          device=args["device"], verbose=False)[0]
        b = r.boxes
        for xyxy, s, c in zip(b.xyxy.tolist(), b.conf.tolist(), b.cls.tolist()):
            out.append({"file": f, "bbox": [xyxy[0], xyxy[1], xyxy[2] - xyxy[0], xyxy[3] - xyxy[1]],
                        "score": s, "cls": int(c)})
    infer[split] = len(files) / max(time.time() - t1, 1e-9)
    detections[split] = out
epochs = None
res = os.path.join(args["project"], "train", "results.csv")
if os.path.isfile(res):
    epochs = max(0, sum(1 for _ in open(res)) - 1)
json.dump({"detections": detections, "infer_images_per_s": infer, "train_seconds": train_s, "epochs": epochs,
           "weights": weights}, open(args["result"], "w"))
'''


def run_peer(py: str, info: Dict[str, Any], workdir: str, budget_min: float, device: str, imgsz: int, batch: int,
             workers: int, seed: int, log: str, threads: int = 0, conf: float = 0.001, max_det: int = 100,
             select: str = "fitness", predict_splits=("test",), amp: bool = False) -> Dict[str, Any]:
    """Train the peer for ``budget_min`` minutes and predict ``predict_splits`` (``conf``/``max_det`` caps).

    ``select`` "AP": best.pt by val mAP50-95 (usdet's BEST_CHECKPOINT.METRIC bbox/AP); "fitness":
    Ultralytics' own 0.9 mAP50-95 + 0.1 mAP50. ``amp``: mixed precision on a GPU (as usdet's GPU recipe).
    """
    root = os.path.dirname(info["yaml"])
    args = {"yaml": info["yaml"], "hours": budget_min / 60.0, "epochs": 10_000, "imgsz": imgsz, "batch": batch,
            "device": device, "workers": workers, "threads": threads, "project": os.path.join(workdir, "runs"),
            "seed": seed, "conf": conf, "max_det": max_det, "select": select, "amp": amp,
            "predict": {s: os.path.join(root, "images", s) for s in predict_splits},
            "result": os.path.join(workdir, "peer_result.json")}
    env = dict(os.environ, **OFFLINE_ENV, YOLO_CONFIG_DIR=os.path.join(workdir, "yolo_config"))
    env.pop("PYTHONPATH", None)
    # Ultralytics looks for Arial.ttf when it checks a dataset and would download it: give it
    # matplotlib's own DejaVu Sans under that name (a local copy, nothing fetched).
    import matplotlib

    font_dir = os.path.join(workdir, "yolo_config", "Ultralytics")
    os.makedirs(font_dir, exist_ok=True)
    shutil.copyfile(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf"),
                    os.path.join(font_dir, "Arial.ttf"))
    t0 = time.time()
    with open(log, "w") as fh:
        rc = subprocess.call([py, "-c", DRIVER, json.dumps(args)], env=env, stdout=fh, stderr=subprocess.STDOUT,
                             cwd=workdir)
    wall = time.time() - t0
    if rc != 0:
        with open(log, encoding="utf-8", errors="replace") as fh:
            raise SystemExit(f"the peer run failed ({rc}); {log}:\n{fh.read()[-3000:]}")
    with open(args["result"], encoding="utf-8") as fh:
        res = json.load(fh)
    res["wall_seconds"] = wall
    return res


def to_coco_results(res: Dict[str, Any], info: Dict[str, Any], split: str = "test") -> List[Dict[str, Any]]:
    files = info["splits"][split]["files"]
    return [{"image_id": files[d["file"]], "category_id": info["category_ids"][d["cls"]], "bbox": d["bbox"],
             "score": d["score"]} for d in res["detections"][split]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset-root", default=os.path.join(REPO, "datasets", "busi"),
                    help="usdet's converted dataset (annotations/{train,val,test}.json), default datasets/busi")
    ap.add_argument("--budget-min", type=float, default=69.0,
                    help="training wall-clock budget in minutes, its per-epoch val included (default 69)")
    ap.add_argument("--device", default="cpu", help="Ultralytics device (default cpu)")
    ap.add_argument("--imgsz", type=int, default=416,
                    help="training/prediction image size (default 416: usdet's input, short edge <= 320, long <= 512)")
    ap.add_argument("--conf", type=float, default=0.001, help="test-time score threshold (default 0.001)")
    ap.add_argument("--max-det", type=int, default=100, help="test-time boxes per image (default 100)")
    ap.add_argument("--select", choices=("fitness", "AP"), default="fitness",
                    help="best.pt by Ultralytics' fitness (default) or by val mAP50-95 alone (AP)")
    ap.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    ap.add_argument("--workers", type=int, default=2, help="data loader workers (default 2)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch CPU threads for the peer (default: all cores, as usdet's training gets; "
                         "Ultralytics alone would use cpu_count - 1, one core of two)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-images", type=int, default=0,
                    help="keep the first N images of each split (smoke runs; default 0 = all)")
    ap.add_argument("--usdet-pred", default=None, help="usdet's test predictions (coco_instances_results.json) to compare")
    ap.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    ap.add_argument("--output", default=os.path.join(REPO, "output", "peer_yolo"), help="reports folder")
    ap.add_argument("--result-name", default="peer_yolo", help="benchmarks/results/<name>.json (default peer_yolo)")
    ap.add_argument("--note", default=None, help="free text stored in the result (what this run is)")
    ap.add_argument("--venv", default=PEER_VENV, help="the peer's virtual environment (default benchmarks/.venv-peer)")
    args = ap.parse_args(argv)

    from usdet.evaluation.compare import compare_models
    from usdet.evaluation.report import evaluate_predictions
    from usdet.utils.io import atomic_write_json

    t_setup = time.time()
    py = peer_python(args.venv)
    setup_s = time.time() - t_setup
    os.makedirs(args.output, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="usdet_peer_") as tmp:
        info = coco_to_yolo(os.path.abspath(args.dataset_root), os.path.join(tmp, "yolo"), max_images=args.max_images)
        if args.max_images > 0:  # the subset's test truth outlives the temporary folder
            kept = os.path.join(args.output, "test_gt.json")
            shutil.copyfile(info["splits"]["test"]["gt"], kept)
            info["splits"]["test"]["gt"] = kept
        res = run_peer(py, info, tmp, args.budget_min, args.device, args.imgsz, args.batch, args.workers, args.seed,
                       os.path.join(args.output, "peer_log.txt"), threads=args.threads, conf=args.conf,
                       max_det=args.max_det, select=args.select)
    preds = to_coco_results(res, info)
    pred_path = os.path.join(args.output, "coco_instances_results.json")
    atomic_write_json(pred_path, preds)
    gt = info["splits"]["test"]["gt"]
    m = evaluate_predictions(gt, pred_path, os.path.join(args.output, "eval"), bootstrap=args.bootstrap,
                             title=f"YOLOv8n from scratch, {args.budget_min:g} min")
    boot = m.get("bootstrap", {}).get("metrics", {})
    result: Dict[str, Any] = OrderedDict(
        peer=f"Ultralytics {ULTRALYTICS.split('==')[1]} YOLOv8n from yolov8n.yaml (no pretrained weights)",
        dataset_root=os.path.relpath(os.path.abspath(args.dataset_root), REPO),
        split_images={k: v["images"] for k, v in info["splits"].items()},
        max_images_per_split=args.max_images or None,
        budget_min=args.budget_min, device=args.device, imgsz=args.imgsz, batch=args.batch, threads=args.threads,
        conf=args.conf, max_det=args.max_det, select=args.select,
        infer_images_per_s_batch1=round(res["infer_images_per_s"]["test"], 2),
        train_wall_s=round(res["train_seconds"], 1), epochs=res["epochs"], peer_setup_s=round(setup_s, 1),
        test={"AP": m["bbox"].get("AP"), "AP50": m["bbox"].get("AP50"), "AP75": m["bbox"].get("AP75"),
              "piou": m["piou"]["score"], "cpm": m["froc"]["cpm"], "image_auc": m["image_level"]["auc"],
              "ci95": {k: [v["low"], v["high"]] for k, v in boot.items()}},
        predictions=os.path.relpath(pred_path, REPO),
    )
    if args.note:
        result["note"] = args.note
    if args.usdet_pred:
        c = compare_models(gt, OrderedDict([("usdet", args.usdet_pred), ("yolo", pred_path)]),
                           os.path.join(args.output, "compare"), n_resamples=args.bootstrap)
        result["comparison_yolo_minus_usdet"] = {k: v["delta"] for k, v in c["metrics"].items()}
        result["usdet_test"] = {k: v["values"]["usdet"] for k, v in c["metrics"].items()}
    write_result(args.result_name, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
