"""Register converted usdet datasets in detectron2's catalogs by name, as its builtins do.

Every converter writes ``$USDET_DATASETS/<dataset>/annotations/<split>.json`` with image paths
relative to ``$USDET_DATASETS/<dataset>/``; registering ``<dataset>_<split>`` for each one means
configs can say ``DATASETS.TRAIN ("busi_train",)`` for any converted dataset with no code change.

Registration is lazy: ``import usdet.data`` registers nothing (the converters, the cropper and
their worker processes never read a dataset JSON nor import detectron2). The engine calls
:func:`ensure_usdet_datasets` when it is imported, i.e. when a trainer, evaluator or predictor
is about to ask for a dataset by name; a name's images and annotations are read only when
``DatasetCatalog.get(name)`` is called.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from typing import Any, Dict, List, Optional, Tuple

logger = logging.getLogger(__name__)

_DEFAULT_ROOT = "datasets"


def _datasets_root(root: Optional[str]) -> str:
    if root is None:
        root = os.environ.get("USDET_DATASETS", _DEFAULT_ROOT)
    return os.path.expanduser(root)


class DatasetFormatError(ValueError):
    """A dataset JSON cannot be used at all; the message names the file and the problem."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def read_coco_json(json_file: str) -> Dict[str, Any]:
    """Parse a COCO JSON and check its top level; raise :class:`DatasetFormatError` naming the file."""
    try:
        with open(json_file, "r", encoding="utf-8") as fh:
            doc = json.load(fh)
    except FileNotFoundError:
        raise DatasetFormatError(json_file, "annotation file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetFormatError(json_file, f"not valid JSON ({e}); was the conversion interrupted? "
                                 "Re-run the converter") from None
    if not isinstance(doc, dict):
        raise DatasetFormatError(json_file, f"expected a COCO object, got a JSON {type(doc).__name__}")
    for key in ("images", "categories"):
        if not isinstance(doc.get(key), list):
            raise DatasetFormatError(json_file, f"missing or malformed top-level '{key}' list "
                                     "(not a COCO detection file)")
    if not doc["categories"]:
        raise DatasetFormatError(json_file, "'categories' is empty: no class to train")
    ids = []
    for i, c in enumerate(doc["categories"]):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int):
            raise DatasetFormatError(json_file, f"categories[{i}] has no integer 'id'")
        ids.append(c["id"])
    if len(set(ids)) != len(ids):
        raise DatasetFormatError(json_file, f"duplicate category ids {sorted(ids)}")
    return doc


def _categories(json_file: str) -> Tuple[List[int], List[str]]:
    """Category ids and names ordered by id (the order detectron2's load_coco_json uses)."""
    cats = sorted(read_coco_json(json_file)["categories"], key=lambda c: c["id"])
    return [int(c["id"]) for c in cats], [str(c.get("name", c["id"])) for c in cats]


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def sanitize_coco(doc: Dict[str, Any], json_file: str, image_root: str = "") -> Tuple[Dict[str, Any], List[str]]:
    """Make a COCO dict safe for detectron2's loader; return (cleaned copy, one message per kind of problem).

    Hand-made or exported JSONs (CVAT, scripts) carry problems that would otherwise crash a long
    run late or, worse, train silently on wrong boxes. What can be repaired is repaired and
    reported; what cannot be trusted is left out and reported:
    images without ``id``/``file_name`` are dropped; missing width/height are read from the file's
    header; images sharing an id are all dropped (their annotations cannot be attributed);
    annotations without ``image_id``/``category_id``/``bbox``, of an unknown image or category, or
    with a box that is not 4 finite numbers of positive size are dropped; boxes partly outside
    their image are clipped to it, boxes wholly outside are dropped; repeated annotation ids are
    renumbered. Raises :class:`DatasetFormatError` when no image is left.
    """
    problems: Dict[str, List[Any]] = {}

    def note(kind: str, item: Any) -> None:
        problems.setdefault(kind, []).append(item)

    cat_ids = {c["id"] for c in doc["categories"]}
    id_count: Dict[Any, int] = {}
    for im in doc["images"]:
        if isinstance(im, dict) and "id" in im:
            id_count[im["id"]] = id_count.get(im["id"], 0) + 1
    images: List[Dict[str, Any]] = []
    dropped_ids = set()  # their annotations go with them, without a second message
    for i, im in enumerate(doc["images"]):
        if not isinstance(im, dict) or "id" not in im:
            note("image entries without 'id' (dropped)", f"images[{i}]")
            continue
        if id_count[im["id"]] > 1:
            note("image entries sharing their id with another (all dropped, with their annotations)", im["id"])
            dropped_ids.add(im["id"])
            continue
        if not isinstance(im.get("file_name"), str) or not im["file_name"]:
            note("image entries without 'file_name' (dropped, with their annotations)", im["id"])
            dropped_ids.add(im["id"])
            continue
        im = dict(im)
        if not (_number(im.get("width")) and _number(im.get("height")) and im["width"] > 0 and im["height"] > 0):
            size = _image_size(os.path.join(image_root, im["file_name"]))
            if size is None:
                note("image entries without a valid width/height whose file could not be read (dropped, with "
                     "their annotations)", im["id"])
                dropped_ids.add(im["id"])
                continue
            note("image entries without a valid width/height (read from the image file)", im["id"])
            im["width"], im["height"] = size
        images.append(im)
    if not images:
        raise DatasetFormatError(json_file, "no usable image entries" + _summary(problems))
    sizes = {im["id"]: (im["width"], im["height"]) for im in images}

    anns: List[Dict[str, Any]] = []
    for i, a in enumerate(doc.get("annotations") or []):
        aid = a.get("id", f"annotations[{i}]") if isinstance(a, dict) else f"annotations[{i}]"
        if not isinstance(a, dict) or any(k not in a for k in ("image_id", "category_id", "bbox")):
            note("annotations missing image_id/category_id/bbox (dropped)", aid)
            continue
        if a["image_id"] not in sizes:
            if a["image_id"] not in dropped_ids:
                note("annotations of an unknown image_id (dropped)", aid)
            continue
        if a["category_id"] not in cat_ids:
            note(f"annotations with a category_id not in 'categories' {sorted(cat_ids)} (dropped)", aid)
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
        x0, y0, x1, y1 = max(0.0, x), max(0.0, y), min(float(W), x + w), min(float(H), y + h)
        if x1 <= x0 or y1 <= y0:
            note("annotations whose bbox lies wholly outside its image (dropped)", aid)
            continue
        a = dict(a)
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            note("annotations whose bbox extends outside its image (clipped to the image)", aid)
            a["bbox"] = [x0, y0, x1 - x0, y1 - y0]
        anns.append(a)
    ids = [a.get("id") for a in anns]
    if None in ids or len(set(ids)) != len(ids):
        note("annotations without a unique 'id' (all renumbered)", len(anns))
        for k, a in enumerate(anns):
            a["id"] = k + 1
    cleaned = dict(doc, images=images, annotations=anns)
    return cleaned, [f"{json_file}: {len(items)} {kind}: {_shown(items)}" for kind, items in problems.items()]


def _shown(items: List[Any]) -> str:
    uniq = list(dict.fromkeys(items))
    return ", ".join(str(x) for x in uniq[:8]) + (f" ... ({len(uniq) - 8} more)" if len(uniq) > 8 else "")


def _summary(problems: Dict[str, List[Any]]) -> str:
    return "".join(f"; {len(v)} {k}: {_shown(v)}" for k, v in problems.items())


def _image_size(path: str) -> Optional[Tuple[int, int]]:
    from PIL import Image

    try:
        with Image.open(path) as img:  # header only
            return img.size
    except Exception:
        return None


def load_usdet_json(json_file: str, image_root: str, dataset_name: Optional[str] = None) -> List[Dict[str, Any]]:
    """detectron2's ``load_coco_json`` after :func:`sanitize_coco`; each problem is logged with the file."""
    from detectron2.data.datasets.coco import load_coco_json

    doc = read_coco_json(json_file)
    cleaned, messages = sanitize_coco(doc, json_file, image_root)
    for m in messages:
        logger.warning("usdet: %s", m)
    if not messages:
        return load_coco_json(json_file, image_root, dataset_name)
    # detectron2 reads a file: hand it the repaired copy (removed right after)
    fd, tmp = tempfile.mkstemp(prefix=".usdet-clean-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(cleaned, fh)
        return load_coco_json(tmp, image_root, dataset_name)
    finally:
        os.unlink(tmp)


def register_usdet_dataset(name: str, json_file: str, image_root: str) -> None:
    """Register one COCO JSON under ``name``; a repeated call replaces the earlier entry harmlessly.

    Raises :class:`DatasetFormatError` (naming the file) when the JSON is unreadable or has no
    categories; problems inside it are repaired or reported when the data is loaded.
    """
    # imported here so that ``import usdet.data`` stays light (no torch) when nothing is registered
    from detectron2.data import DatasetCatalog, MetadataCatalog

    json_file = os.path.abspath(json_file)
    image_root = os.path.abspath(image_root)
    cat_ids, thing_classes = _categories(json_file)
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    # load_coco_json maps contiguous ids itself when categories are 1..K; keep the JSON's order.
    DatasetCatalog.register(name, lambda: load_usdet_json(json_file, image_root, name))
    MetadataCatalog.get(name).set(
        thing_classes=thing_classes,
        # Set up front (load_coco_json sets the same) so evaluators work before the data is loaded.
        thing_dataset_id_to_contiguous_id={cid: i for i, cid in enumerate(cat_ids)},
        json_file=json_file,
        image_root=image_root,
        evaluator_type="coco",
    )


def register_all_usdet_datasets(root: Optional[str] = None) -> List[str]:
    """Register ``<dataset>_<split>`` for every ``<root>/<dataset>/annotations/<split>.json``.

    ``root`` defaults to ``$USDET_DATASETS`` or ``datasets/``. A missing root registers nothing
    (a fresh checkout has no data). Returns the registered names, sorted.
    """
    root = _datasets_root(root)
    names: List[str] = []
    if not os.path.isdir(root):
        return names
    for dataset in sorted(os.listdir(root)):
        ann_dir = os.path.join(root, dataset, "annotations")
        if not os.path.isdir(ann_dir):
            continue
        for fname in sorted(os.listdir(ann_dir)):
            if not fname.endswith(".json") or fname.startswith("."):
                continue
            split = fname[: -len(".json")]
            name = f"{dataset}_{split}"
            try:
                register_usdet_dataset(name, os.path.join(ann_dir, fname), os.path.join(root, dataset))
            except (OSError, ValueError, KeyError) as e:
                logger.warning("usdet: not registering %s (%s: %s)", name, os.path.join(ann_dir, fname), e)
                continue
            names.append(name)
    return names


_REGISTERED_ROOTS: Dict[str, List[str]] = {}


def ensure_usdet_datasets(root: Optional[str] = None) -> List[str]:
    """Register ``$USDET_DATASETS`` (or ``root``) once per process; later calls return the same names.

    What a trainer (or any consumer of dataset names) calls instead of relying on import side
    effects. :func:`register_all_usdet_datasets` re-registers unconditionally (after a re-conversion).
    """
    key = os.path.abspath(_datasets_root(root))
    if key not in _REGISTERED_ROOTS:
        _REGISTERED_ROOTS[key] = register_all_usdet_datasets(key)
    return list(_REGISTERED_ROOTS[key])
