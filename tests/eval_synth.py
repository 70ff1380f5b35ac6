"""Synthetic ground truth and two models' detections with a controlled difference (no images)."""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np

CATS = [{"id": 1, "name": "lesion"}]


def synth_gt(n: int, seed: int = 0, normal_frac: float = 0.25, attrs: bool = False) -> Dict[str, Any]:
    """``n`` 200x200 images, a quarter lesion-free, lesion images with one box (some two)."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(1, n + 1):
        im = {"id": i, "file_name": f"{i}.png", "width": 200, "height": 200}
        if attrs:
            im["device"] = ["scannerA", "scannerB"][i % 2]
            if i % 3 == 0:
                im["pixel_size_cm"] = 0.01
        if rng.random() >= normal_frac:
            k = 2 if rng.random() < 0.15 else 1
            for j in range(k):
                w, h = rng.uniform(15, 80, size=2)
                x, y = rng.uniform(0, 200 - w), rng.uniform(0, 200 - h)
                anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1,
                             "bbox": [float(x), float(y), float(w), float(h)], "area": float(w * h), "iscrowd": 0})
        if attrs:
            im["label"] = "lesion" if any(a["image_id"] == i for a in anns[-2:]) else "normal"
        images.append(im)
    return {"images": images, "annotations": anns, "categories": CATS}


def synth_model(gt: Dict[str, Any], hit_rate: float, seed: int, jitter: float = 4.0,
                n_low: int = 9) -> List[Dict[str, Any]]:
    """A model that finds each lesion with probability ``hit_rate`` (high score, jittered box) and
    otherwise puts a lower-scored box elsewhere; lesion-free images get a low-scored false alarm.
    Like a detectron2 model's output, every image also gets ``n_low`` scattered low-score boxes
    (score < 0.1), so FROC reaches all its rates (up to 8 FP/image) and CPM is defined."""
    rng = np.random.default_rng(seed)
    by_img: Dict[int, List[List[float]]] = {im["id"]: [] for im in gt["images"]}
    for a in gt["annotations"]:
        by_img[a["image_id"]].append(a["bbox"])
    preds = []
    for i, boxes in by_img.items():
        for b in boxes:
            if rng.random() < hit_rate:
                box = [b[0] + rng.normal(0, jitter), b[1] + rng.normal(0, jitter), b[2], b[3]]
                preds.append({"image_id": i, "category_id": 1, "bbox": box, "score": float(rng.uniform(0.5, 1.0))})
            else:
                preds.append({"image_id": i, "category_id": 1, "bbox": [150.0, 150.0, 30.0, 30.0],
                              "score": float(rng.uniform(0.3, 0.8))})
        if not boxes:
            preds.append({"image_id": i, "category_id": 1, "bbox": [5.0, 5.0, 30.0, 30.0],
                          "score": float(rng.uniform(0.0, 0.7))})
        for _ in range(n_low):
            x, y = rng.uniform(0, 170, size=2)
            preds.append({"image_id": i, "category_id": 1, "bbox": [float(x), float(y), 20.0, 20.0],
                          "score": float(rng.uniform(0.001, 0.1))})
    return preds


def take_images(gt: Dict[str, Any], preds: List[Dict[str, Any]], ids) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    ids = set(ids)
    g = dict(gt, images=[im for im in gt["images"] if im["id"] in ids],
             annotations=[a for a in gt["annotations"] if a["image_id"] in ids])
    return g, [p for p in preds if p["image_id"] in ids]
