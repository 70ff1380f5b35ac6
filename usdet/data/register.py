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
import os
import tempfile
from typing import Any, Dict, List, Optional, Tuple

from usdet.data.coco_clean import clean_coco

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


def sanitize_coco(doc: Dict[str, Any], json_file: str, image_root: str = "") -> Tuple[Dict[str, Any], List[str]]:
    """Make a COCO dict safe for detectron2's loader: the one cleaner of usdet
    (:func:`usdet.data.coco_clean.clean_coco`, shared with evaluation so that training-time and
    offline scores see the same truth), requiring image files. Raises :class:`DatasetFormatError`
    when no image is left."""
    cleaned, messages = clean_coco(doc, json_file, image_root=image_root, require_file_name=True)
    if not cleaned["images"]:
        raise DatasetFormatError(json_file, "no usable image entries; " + "; ".join(messages))
    return cleaned, messages


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
