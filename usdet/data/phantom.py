"""Synthetic breast-ultrasound phantoms with known lesion boxes.

They let the whole pipeline (convert -> register -> train -> evaluate -> draw) run and be tested
with no patient data: speckled layered tissue, hypo-echoic lesions (benign-like: round, smooth,
wider than tall, posterior enhancement; malignant-like: spiculated, taller than wide, posterior
shadowing) and some lesion-free frames as negatives. Boxes come from the drawn masks, exactly.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from usdet.data.coco import PixelStats, categories_for, mask_to_annotation, mask_to_box, write_coco_dataset
from usdet.data.split import SPLITS, group_stratified_split
from usdet.utils.io import atomic_write_image

LESION_KINDS = ("benign", "malignant")


def _parse_classes(classes: Union[str, Sequence[str]]) -> List[str]:
    names = [c.strip() for c in classes.split(",")] if isinstance(classes, str) else list(classes)
    if names not in (["lesion"], ["benign", "malignant"]):
        raise ValueError(f"classes must be 'lesion' or 'benign,malignant', got {classes!r}")
    return names


def _tissue(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Echogenicity map: bright skin line, dark fat lobules, brighter glandular layer, muscle."""
    y = np.arange(h, dtype=np.float32)[:, None] / h
    x = np.arange(w, dtype=np.float32)[None, :] / w
    wave = lambda amp, f, ph: amp * np.sin(2 * np.pi * (f * x + ph))  # noqa: E731
    skin = 0.04 + wave(0.01, 1.0, rng.random())
    fat = skin + 0.18 + wave(0.04, rng.uniform(0.5, 1.5), rng.random())
    gland = fat + 0.45 + wave(0.05, rng.uniform(0.5, 1.5), rng.random())
    echo = np.full((h, w), 0.45, np.float32)
    echo = np.where(y < skin, 0.95, echo)
    lobules = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), max(h, w) / 25)
    lobules = (lobules - lobules.mean()) / (lobules.std() + 1e-6)
    echo = np.where((y >= skin) & (y < fat), 0.3 + 0.06 * lobules, echo)
    echo = np.where((y >= fat) & (y < gland), 0.6 + 0.1 * lobules, echo)
    striations = 0.5 + 0.08 * np.sin(2 * np.pi * (y * 18 + 0.3 * x))
    echo = np.where(y >= gland, striations, echo)
    return echo * np.exp(-0.6 * y)  # depth attenuation


def _lesion_polygon(rng: np.random.Generator, kind: str, cx: float, cy: float, r: float) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 90, endpoint=False)
    if kind == "benign":  # smooth ellipse, wider than tall
        ax, ay = r * rng.uniform(1.2, 1.6), r * rng.uniform(0.7, 0.9)
        rad = 1 + 0.05 * np.sin(2 * t + rng.random() * 6)
    else:  # irregular, spiculated, taller than wide
        ax, ay = r * rng.uniform(0.8, 1.0), r * rng.uniform(1.0, 1.3)
        rad = 1 + sum(rng.uniform(0.05, 0.15) * np.sin(k * t + rng.random() * 6) for k in (3, 5, 7))
        spikes = (rng.random(t.size) < 0.18) * rng.uniform(0.2, 0.5, t.size)
        rad = rad + spikes
    pts = np.stack([cx + ax * rad * np.cos(t), cy + ay * rad * np.sin(t)], axis=1)
    return np.round(pts).astype(np.int32)


def add_lesion(echo: np.ndarray, mask: np.ndarray, kind: str) -> np.ndarray:
    """``echo`` with a hypo-echoic lesion where ``mask`` (uint8 0/1) is set, and its posterior
    acoustic feature below it: enhancement (benign) or shadowing (malignant)."""
    h, w = echo.shape
    x, y, bw, bh = (int(v) for v in mask_to_box(mask))
    below = np.zeros((h, w), np.float32)
    below[y + bh:, x:x + bw] = 1.0
    below = cv2.GaussianBlur(below, (0, 0), max(1.0, bw / 6))
    echo = echo * (1 + (0.35 if kind == "benign" else -0.55) * below)
    soft = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 0.8 if kind == "benign" else 0.4)
    level = 0.12 if kind == "benign" else 0.07
    return echo * (1 - soft) + level * soft


def speckle_field(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Fully developed speckle: Rayleigh multiplicative noise of mean 1, correlated laterally like
    a real point-spread function."""
    speckle = rng.rayleigh(1.0, (h, w)).astype(np.float32)
    speckle = cv2.GaussianBlur(speckle, (0, 0), sigmaX=1.2, sigmaY=0.6)
    speckle /= speckle.mean()
    return speckle


def render_phantom(
    rng: np.random.Generator,
    size: Union[int, Tuple[int, int]] = 128,
    kinds: Optional[Sequence[str]] = None,
    return_masks: bool = False,
):
    """Render one frame; returns ``(rgb, boxes, labels)`` (+ ``masks`` if ``return_masks``).

    ``kinds`` lists the lesions to draw ("benign"/"malignant"); None picks 0-2 at random,
    ``[]`` gives a lesion-free frame. Boxes are ``[x, y, w, h]`` floats tight on each mask.
    """
    h, w = (size, size) if isinstance(size, int) else size
    if kinds is None:
        n = int(rng.choice([0, 1, 1, 1, 2]))
        kinds = [str(rng.choice(LESION_KINDS))] * n
    echo = _tissue(rng, h, w)
    masks: List[np.ndarray] = []
    occupied = np.zeros((h, w), np.uint8)
    for kind in kinds:
        if kind not in LESION_KINDS:
            raise ValueError(f"unknown lesion kind {kind!r}; expected one of {LESION_KINDS}")
        for _ in range(20):  # find a spot that does not overlap an earlier lesion
            r = rng.uniform(0.07, 0.14) * min(h, w)
            cx, cy = rng.uniform(0.25, 0.75) * w, rng.uniform(0.35, 0.7) * h
            mask = np.zeros((h, w), np.uint8)
            cv2.fillPoly(mask, [_lesion_polygon(rng, kind, cx, cy, r)], 1)
            if not (mask & occupied).any():
                break
        occupied |= cv2.dilate(mask, np.ones((5, 5), np.uint8))
        echo = add_lesion(echo, mask, kind)
        masks.append(mask.astype(bool))
    speckle = speckle_field(rng, h, w)
    gray = np.clip(echo * speckle * 255 * 0.9, 0, 255).astype(np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    boxes = [mask_to_box(m) for m in masks]
    labels = list(kinds)
    if return_masks:
        return rgb, boxes, labels, masks
    return rgb, boxes, labels


def _frame_kinds(i: int, rng: np.random.Generator) -> List[str]:
    """Every fifth frame is lesion-free; others alternate benign/malignant, some with two lesions."""
    if i % 5 == 4:
        return []
    kind = LESION_KINDS[i % 2]
    return [kind] * (2 if rng.random() < 0.15 else 1)


def make_phantom_dataset(
    out_dir: str,
    num_images: int = 24,
    size: int = 128,
    seed: int = 0,
    classes: Union[str, Sequence[str]] = "lesion",
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
) -> str:
    """Write a complete usdet COCO layout of phantoms to ``out_dir`` and return ``out_dir``.

    Same arguments give byte-identical files. Layout: images/phantom_NNNN.png,
    annotations/{train,val,test}.json, pixel_stats.json, report.json.
    """
    names = _parse_classes(classes)
    categories = categories_for(names)
    cat_id = {c["name"]: c["id"] for c in categories}
    records: List[Dict[str, Any]] = []
    for i in range(num_images):
        rng = np.random.default_rng([seed, i])
        kinds = _frame_kinds(i, rng)
        rgb, boxes, labels, masks = render_phantom(rng, size, kinds, return_masks=True)
        stem = f"phantom_{i + 1:04d}"
        file_name = f"images/{stem}.png"
        atomic_write_image(os.path.join(out_dir, file_name), rgb)
        image = {
            "id": i + 1, "file_name": file_name, "width": int(rgb.shape[1]), "height": int(rgb.shape[0]),
            "source_file": stem, "crop_box": [0, 0, int(rgb.shape[1]), int(rgb.shape[0])],
            "group": stem, "label": labels[0] if labels else "normal",
        }
        anns = []
        for label, mask in zip(labels, masks):
            ann = mask_to_annotation(mask, cat_id["lesion" if names == ["lesion"] else label], image_id=i + 1)
            anns.append(ann)
        records.append({"image": image, "anns": anns, "rgb_moments": rgb})

    keys = [r["image"]["source_file"] for r in records]
    assignment = group_stratified_split(keys, keys, [r["image"]["label"] for r in records], fractions, seed)
    images_by_split: Dict[str, list] = {s: [] for s in SPLITS}
    anns_by_split: Dict[str, list] = {s: [] for s in SPLITS}
    stats = PixelStats()
    counts: Dict[str, Dict[str, Any]] = {}
    for r in records:
        split = assignment[r["image"]["source_file"]]
        images_by_split[split].append(r["image"])
        anns_by_split[split].extend(r["anns"])
        if split == "train":
            stats.add(r["rgb_moments"])
        c = counts.setdefault(split, {"images": 0, "annotations": 0, "images_by_label": {}})
        c["images"] += 1
        c["annotations"] += len(r["anns"])
        c["images_by_label"][r["image"]["label"]] = c["images_by_label"].get(r["image"]["label"], 0) + 1
    report = {
        "dataset": "phantom", "num_images": num_images, "size": size, "seed": seed, "classes": names,
        "split_fractions": [float(f) for f in fractions],
        "counts": {s: counts.get(s, {"images": 0, "annotations": 0, "images_by_label": {}}) for s in SPLITS},
        "skipped": [], "duplicate_groups": [],
    }
    write_coco_dataset(out_dir, images_by_split, anns_by_split, categories, report=report,
                       pixel_stats=stats.result("train"), info={"description": "usdet synthetic ultrasound phantoms"})
    return out_dir
