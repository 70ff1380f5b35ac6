"""COCO building blocks shared by every usdet converter (BUSI, hospital frames, phantoms).

One place decides how a mask becomes a box and how the output
folder is written, so every dataset usdet produces has the same keys and the same guarantees
(deterministic bytes, atomic files, JSONs written only after the images they point to).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import cv2
import numpy as np

from usdet.data.split import SPLITS as SPLIT_ORDER
from usdet.utils.io import atomic_write_json


def categories_for(classes: Sequence[str]) -> List[Dict[str, Any]]:
    """COCO categories with 1-based ids in the given order, e.g. ``["benign", "malignant"]``."""
    return [{"id": i + 1, "name": str(name)} for i, name in enumerate(classes)]


def mask_to_box(mask: np.ndarray) -> Optional[List[float]]:
    """Tight ``[x, y, w, h]`` around the mask's non-zero pixels (w = last col - first col + 1); None if empty."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    m8 = mask.view(np.uint8) if mask.dtype == bool else (mask != 0).view(np.uint8)
    x, y, w, h = cv2.boundingRect(np.ascontiguousarray(m8))  # bounding box of the non-zero pixels
    if w == 0 or h == 0:
        return None
    return [float(x), float(y), float(w), float(h)]


def encode_rle(mask: np.ndarray, box: Optional[Sequence[float]] = None) -> Dict[str, Any]:
    """Compressed COCO RLE (counts as str, so it is JSON-serialisable) of a 2-D mask.

    COCO RLE runs down the columns, so every column left and right of the mask's box is one
    long run of zeros: only the box's column band is read (transposed, a fraction of the frame),
    its run lengths taken with numpy, the two outer zero runs added, and pycocotools compresses
    the counts (``frPyObjects``), the same bytes as ``pycocotools.mask.encode`` of the whole
    frame (tested) at a third of its cost on a converter's per-image path. ``box``: the mask's
    ``[x, y, w, h]`` when the caller has it.
    """
    from pycocotools import mask as mask_util

    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    m8 = np.ascontiguousarray(mask.view(np.uint8) if mask.dtype == bool else (mask > 0).view(np.uint8))
    h, w = m8.shape
    if box is None:
        box = mask_to_box(m8) or [0, 0, 0, 0]
    x0, bw = int(box[0]), int(box[2])
    if bw == 0 or h == 0:
        runs = [h * w]
    else:
        band = cv2.transpose(m8[:, x0:x0 + bw]).ravel()  # the band in column-major order
        change = np.flatnonzero(band[1:] != band[:-1]) + 1
        runs = np.diff(np.concatenate(([0], change, [band.size]))).tolist()
        if band[0]:  # RLE starts with a (here empty) run of zeros
            runs.insert(0, 0)
        runs[0] += x0 * h  # the zero columns left of the band
        right = (w - x0 - bw) * h  # and right of it
        if right and band[-1]:
            runs.append(right)
        elif right:
            runs[-1] += right
    rle = mask_util.frPyObjects({"size": [h, w], "counts": runs}, h, w)
    return {"size": [h, w], "counts": rle["counts"].decode("ascii")}


def mask_to_annotation(
    mask: np.ndarray,
    category_id: int = 1,
    image_id: Optional[int] = None,
    ann_id: Optional[int] = None,
    with_segmentation: bool = True,
) -> Optional[Dict[str, Any]]:
    """One COCO annotation for a whole mask (box, pixel area, RLE), or None when the mask is empty.

    The mask must already be in the written image's pixel grid (after crop/resize), so the box
    covers exactly the pixels a model will see.
    """
    mask = np.asarray(mask)
    if mask.dtype != bool:
        mask = mask > 0
    box = mask_to_box(mask)
    if box is None:
        return None
    ann: Dict[str, Any] = {}
    if ann_id is not None:
        ann["id"] = int(ann_id)
    if image_id is not None:
        ann["image_id"] = int(image_id)
    ann.update({"category_id": int(category_id), "bbox": box, "area": float(np.count_nonzero(mask))})
    if with_segmentation:
        ann["segmentation"] = encode_rle(mask, box)
    ann["iscrowd"] = 0
    return ann


class PixelStats:
    """Streaming per-channel mean/std (0-255 scale): add images one at a time, never hold them all."""

    def __init__(self) -> None:
        self.count = 0  # pixels
        self.num_images = 0
        self._sum = np.zeros(3, np.float64)
        self._sumsq = np.zeros(3, np.float64)

    def add(self, rgb: np.ndarray) -> None:
        self.add_moments(*image_moments(rgb))

    def add_moments(self, num_pixels: int, channel_sum: Sequence[float], channel_sumsq: Sequence[float]) -> None:
        """Merge precomputed sums (e.g. from a worker process that saw the image)."""
        self.count += int(num_pixels)
        self.num_images += 1
        self._sum += np.asarray(channel_sum, np.float64)
        self._sumsq += np.asarray(channel_sumsq, np.float64)

    def result(self, split: str = "train") -> Dict[str, Any]:
        if self.count == 0:
            mean = std = [float("nan")] * 3
        else:
            m = self._sum / self.count
            var = np.maximum(self._sumsq / self.count - m * m, 0.0)
            mean = [round(float(v), 4) for v in m]
            std = [round(float(v), 4) for v in np.sqrt(var)]
        return {"mean": mean, "std": std, "split": split, "num_images": self.num_images}


def image_moments(rgb: np.ndarray) -> tuple:
    """(num_pixels, per-channel sum, per-channel sum of squares) of a uint8 image, as exact integers.

    Integer sums make the statistics identical whatever order or process the images come from.
    Below 2**24 pixels OpenCV's one-pass ``meanStdDev`` (a tenth of a histogram's cost) gives
    them: its double mean and deviation carry errors below 1e-3 of a unit once multiplied back
    by the pixel count, so rounding recovers the integers exactly (tested against numpy);
    larger images count every value (``np.bincount``).
    """
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8:
        raise ValueError(f"pixel statistics expect uint8 images, got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[..., None]
    arr = np.ascontiguousarray(arr)
    flat = arr.reshape(-1, arr.shape[2])
    n = flat.shape[0]
    if 0 < n < 2 ** 24 and flat.shape[1] <= 4:
        mean, dev = (v.ravel().tolist() for v in cv2.meanStdDev(arr))
        sums = [round(m * n) for m in mean]
        sumsqs = [round((d * d + m * m) * n) for m, d in zip(mean, dev)]
    else:
        levels = np.arange(256, dtype=np.int64)
        hists = [np.bincount(flat[:, c], minlength=256).astype(np.int64) for c in range(flat.shape[1])]
        sums = [int(h @ levels) for h in hists]
        sumsqs = [int(h @ (levels * levels)) for h in hists]
    if len(sums) == 1:  # grayscale counts as R=G=B
        sums, sumsqs = sums * 3, sumsqs * 3
    return flat.shape[0], sums[:3], sumsqs[:3]


def compute_pixel_stats(images: Iterable[np.ndarray], split: str = "train") -> Dict[str, Any]:
    """``{"mean", "std", "split", "num_images"}`` over RGB arrays, streamed one at a time."""
    stats = PixelStats()
    for img in images:
        n, s, ss = image_moments(img)
        stats.add_moments(n, s, ss)
    return stats.result(split)


def validate_coco(images: List[Dict[str, Any]], annotations: List[Dict[str, Any]],
                  categories: List[Dict[str, Any]], where: str = "") -> None:
    """Raise ValueError on what would break loaders later: duplicate ids, dangling references, bad boxes."""
    image_ids = [im["id"] for im in images]
    if len(set(image_ids)) != len(image_ids):
        raise ValueError(f"{where}: duplicate image ids")
    cat_ids = {c["id"] for c in categories}
    known = set(image_ids)
    ann_ids = [a["id"] for a in annotations]
    if len(set(ann_ids)) != len(ann_ids):
        raise ValueError(f"{where}: duplicate annotation ids")
    for a in annotations:
        if a["image_id"] not in known:
            raise ValueError(f"{where}: annotation {a['id']} points at unknown image {a['image_id']}")
        if a["category_id"] not in cat_ids:
            raise ValueError(f"{where}: annotation {a['id']} has unknown category {a['category_id']}")
        if len(a["bbox"]) != 4 or a["bbox"][2] <= 0 or a["bbox"][3] <= 0:
            raise ValueError(f"{where}: annotation {a['id']} has an empty or malformed bbox {a['bbox']}")


def write_coco_dataset(
    out_dir: str,
    images_by_split: Mapping[str, List[Dict[str, Any]]],
    annotations_by_split: Mapping[str, List[Dict[str, Any]]],
    categories: List[Dict[str, Any]],
    report: Optional[Dict[str, Any]] = None,
    pixel_stats: Optional[Dict[str, Any]] = None,
    info: Optional[Dict[str, Any]] = None,
) -> Dict[str, str]:
    """Write ``out_dir/annotations/<split>.json`` (+ pixel_stats.json, report.json), atomically.

    Call after every image is on disk. Entries are sorted by id so equal inputs give
    byte-identical files; annotations without an ``id`` get 1-based ids in image order.
    report.json is written last, so its presence marks a finished conversion; if any write
    fails (disk full), the JSONs this call already wrote are removed before the error propagates.
    Returns ``{split: json_path}``.
    """
    categories = sorted(categories, key=lambda c: c["id"])
    paths: Dict[str, str] = {}
    written: List[str] = []
    try:
        splits = [s for s in SPLIT_ORDER if s in images_by_split] + sorted(set(images_by_split) - set(SPLIT_ORDER))
        for split in splits:
            images = sorted(images_by_split[split], key=lambda im: im["id"])
            anns = list(annotations_by_split.get(split, []))
            order = {im["id"]: i for i, im in enumerate(images)}
            if any("id" not in a for a in anns):
                anns.sort(key=lambda a: (order.get(a["image_id"], -1), a.get("bbox", [])))
                anns = [dict(a, id=i + 1) if "id" not in a else a for i, a in enumerate(anns)]
            anns.sort(key=lambda a: a["id"])
            validate_coco(images, anns, categories, where=f"{out_dir} split {split!r}")
            doc: Dict[str, Any] = {}
            if info is not None:
                doc["info"] = dict(info, split=split)
            doc.update({"images": images, "annotations": anns, "categories": categories})
            path = os.path.join(out_dir, "annotations", f"{split}.json")
            atomic_write_json(path, doc, indent=None)  # compact, as COCO files are: json's C encoder, 5x faster
            written.append(path)
            paths[split] = path
        if pixel_stats is not None:
            atomic_write_json(os.path.join(out_dir, "pixel_stats.json"), pixel_stats)
            written.append(os.path.join(out_dir, "pixel_stats.json"))
        if report is not None:
            atomic_write_json(os.path.join(out_dir, "report.json"), report)
    except BaseException:
        # all or nothing: a dataset missing some of its JSONs (disk full half-way) must not look usable
        for path in written:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
        raise
    return paths


def invalidate_previous_output(out_dir: str) -> None:
    """Remove an earlier run's JSONs before touching its images (report.json, the completion mark, first).

    Otherwise a run killed half-way would leave old JSONs that look valid but describe images
    this run has already replaced (e.g. with other options or another split). Shared by the converters.
    """
    names = ["report.json", "pixel_stats.json"] + [f"annotations/{s}.json" for s in SPLIT_ORDER]
    for rel in names:
        try:
            os.remove(os.path.join(out_dir, rel))
        except FileNotFoundError:
            pass
    # temp files of JSONs a killed run was writing (usdet.utils.io.atomic_write names them
    # ".<name>.<random>.tmp"); only the converters' own JSON names are matched
    for folder in (out_dir, os.path.join(out_dir, "annotations")):
        if not os.path.isdir(folder):
            continue
        ours = {os.path.basename(n) for n in names if os.path.dirname(os.path.join(out_dir, n)) == folder}
        for fname in os.listdir(folder):
            if fname.startswith(".") and fname.endswith(".tmp") and any(
                    fname.startswith(f".{n}.") for n in ours):
                os.remove(os.path.join(folder, fname))


def remove_stale_images(out_dir: str, folders: Iterable[str], keep: set) -> None:
    """Delete what an earlier run left in ``OUT/images/<folder>/`` that this run does not reference.

    ``keep`` holds file names relative to OUT (``images/<folder>/<name>``). Only a converter's own
    outputs are touched: .png/.jpg images and hidden temp files a killed run left.
    """
    for sub in folders:
        folder = os.path.join(out_dir, "images", sub)
        if not os.path.isdir(folder):
            continue
        for fname in os.listdir(folder):
            rel = f"images/{sub}/{fname}"
            is_temp = fname.startswith(".") and fname.endswith(".tmp")
            if is_temp or (rel not in keep and os.path.splitext(fname)[1].lower() in (".png", ".jpg")):
                os.remove(os.path.join(folder, fname))
