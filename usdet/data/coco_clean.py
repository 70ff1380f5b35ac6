"""The one COCO ground-truth cleaner: registration for training, the evaluators, reports, overlays.

A COCO file from elsewhere may lack ids, repeat them, name unknown images or categories, or hold
boxes that are not numbers or lie outside their image. Every reader of a ground truth in usdet
goes through :func:`clean_coco`, so that training-time and offline scores see the same truth and
each problem is named once, with the file.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["clean_coco"]


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _image_size(path: str) -> Optional[Tuple[int, int]]:
    from PIL import Image

    try:
        with Image.open(path) as img:  # header only
            return img.size
    except Exception:
        return None


def _shown(items: List[Any]) -> str:
    uniq = list(dict.fromkeys(repr(x) if isinstance(x, (list, dict)) else x for x in items))
    return ", ".join(str(x) for x in uniq[:8]) + (f" ... ({len(uniq) - 8} more)" if len(uniq) > 8 else "")


def clean_coco(
    doc: Dict[str, Any],
    source: str = "ground truth",
    *,
    image_root: Optional[str] = None,
    require_file_name: bool = False,
) -> Tuple[Dict[str, Any], List[str]]:
    """The one ground-truth cleaner (registration, training-time evaluator, reports, overlays).

    Returns a cleaned copy of a COCO dict and one message per kind of problem (naming ``source``).
    Images without ``id``, or sharing their id with another (their annotations cannot be
    attributed), are dropped. Annotations without ``image_id``/``category_id``/``bbox``, of an
    unknown image or category, with a box that is not 4 finite numbers or of non-positive size,
    or lying wholly outside their image, are dropped; boxes partly outside are clipped to the
    image. Crowd annotations (``iscrowd: 1``, ignore regions) are kept as such. Repeated
    annotation ids are renumbered (pycocotools needs unique ids).

    Training needs the image files, evaluation does not: ``require_file_name`` drops images
    without ``file_name``; ``image_root`` reads a missing width/height from the image file (an
    unreadable one drops the image); without it such an image is kept and its boxes not clipped.
    """
    problems: Dict[str, List[Any]] = {}

    def note(kind: str, item: Any) -> None:
        problems.setdefault(kind, []).append(item)

    cats = []
    for i, c in enumerate(doc.get("categories") or []):
        if not isinstance(c, dict) or "id" not in c:
            note("category entries without 'id' (dropped)", f"categories[{i}]")
            continue
        cats.append(c)
    cat_ids = {c["id"] for c in cats}
    id_count: Dict[Any, int] = {}
    for im in doc.get("images") or []:
        if isinstance(im, dict) and "id" in im:
            try:
                id_count[im["id"]] = id_count.get(im["id"], 0) + 1
            except TypeError:  # an unhashable id
                pass
    images: List[Dict[str, Any]] = []
    dropped_ids = set()  # their annotations go with them, without a second message
    for i, im in enumerate(doc.get("images") or []):
        if not isinstance(im, dict) or "id" not in im or id_count.get(_hashable(im["id"]), 0) == 0:
            note("image entries without a usable 'id' (dropped)", f"images[{i}]")
            continue
        if id_count[im["id"]] > 1:
            note("image entries with a duplicate image id, sharing their id with another (all dropped, "
                 "with their annotations)", im["id"])
            dropped_ids.add(im["id"])
            continue
        if require_file_name and (not isinstance(im.get("file_name"), str) or not im["file_name"]):
            note("image entries without 'file_name' (dropped, with their annotations)", im["id"])
            dropped_ids.add(im["id"])
            continue
        im = dict(im)
        if not (_number(im.get("width")) and _number(im.get("height")) and im["width"] > 0 and im["height"] > 0):
            if image_root is not None:
                size = _image_size(os.path.join(image_root, str(im.get("file_name", ""))))
                if size is None:
                    note("image entries without a valid width/height whose file could not be read (dropped, "
                         "with their annotations)", im["id"])
                    dropped_ids.add(im["id"])
                    continue
                note("image entries without a valid width/height (read from the image file)", im["id"])
                im["width"], im["height"] = size
        images.append(im)
    sizes = {im["id"]: (im.get("width"), im.get("height")) for im in images}

    anns: List[Dict[str, Any]] = []
    for i, a in enumerate(doc.get("annotations") or []):
        aid = a.get("id", f"annotations[{i}]") if isinstance(a, dict) else f"annotations[{i}]"
        if not isinstance(a, dict) or any(k not in a for k in ("image_id", "category_id", "bbox")):
            note("annotations missing image_id/category_id/bbox (dropped)", aid)
            continue
        if _hashable(a["image_id"]) not in sizes:
            if _hashable(a["image_id"]) not in dropped_ids:
                note("annotations of an unknown image_id (dropped)", aid)
            continue
        if _hashable(a["category_id"]) not in cat_ids:
            note(f"annotations with an unknown category_id, not in 'categories' {sorted(cat_ids, key=str)} (dropped)",
                 aid)
            continue
        box = a["bbox"]
        if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(_number(v) for v in box)):
            note("annotations whose bbox is not 4 finite numbers (dropped)", aid)
            continue
        x, y, w, h = (float(v) for v in box)
        if w <= 0 or h <= 0:
            note("annotations with a non-positive bbox width or height (dropped)", aid)
            continue
        W, H = sizes[a["image_id"]]
        x0, y0, x1, y1 = x, y, x + w, y + h
        if _number(W) and _number(H):
            x0, y0, x1, y1 = max(0.0, x), max(0.0, y), min(float(W), x + w), min(float(H), y + h)
            if x1 <= x0 or y1 <= y0:
                note("annotations whose bbox lies wholly outside its image (dropped)", aid)
                continue
        a = dict(a)
        a["bbox"] = [x0, y0, x1 - x0, y1 - y0]
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            note("annotations whose bbox extends outside the image (clipped to the image)", aid)
            a.pop("area", None)
        a["iscrowd"] = 1 if a.get("iscrowd", 0) else 0
        if not _number(a.get("area")):
            a["area"] = a["bbox"][2] * a["bbox"][3]
        anns.append(a)
    ids = [a.get("id") for a in anns]
    if None in ids or len(set(map(_hashable, ids))) != len(ids):
        note("annotations without a unique 'id' (all renumbered)", len(anns))
        for k, a in enumerate(anns):
            a["id"] = k + 1
    cleaned = dict(doc, images=images, annotations=anns, categories=cats)
    return cleaned, [f"{source}: {len(items)} {kind}: {_shown(items)}" for kind, items in problems.items()]


def _hashable(v: Any) -> Any:
    try:
        hash(v)
        return v
    except TypeError:
        return repr(v)
