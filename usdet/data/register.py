"""Register converted usdet datasets in detectron2's catalogs by name, as its builtins do.

Every converter writes ``$USDET_DATASETS/<dataset>/annotations/<split>.json`` with image paths
relative to ``$USDET_DATASETS/<dataset>/``; registering ``<dataset>_<split>`` for each one means
configs can say ``DATASETS.TRAIN ("busi_train",)`` for any converted dataset with no code change.
"""
from __future__ import annotations

import json
import logging
import os
from typing import List, Optional, Tuple

logger = logging.getLogger(__name__)

_DEFAULT_ROOT = "datasets"


def _datasets_root(root: Optional[str]) -> str:
    if root is None:
        root = os.environ.get("USDET_DATASETS", _DEFAULT_ROOT)
    return os.path.expanduser(root)


def _categories(json_file: str) -> Tuple[List[int], List[str]]:
    """Category ids and names ordered by id (the order detectron2's load_coco_json uses)."""
    with open(json_file, "r", encoding="utf-8") as fh:
        cats = json.load(fh).get("categories", [])
    cats = sorted(cats, key=lambda c: c["id"])
    return [int(c["id"]) for c in cats], [str(c["name"]) for c in cats]


def register_usdet_dataset(name: str, json_file: str, image_root: str) -> None:
    """Register one COCO JSON under ``name``; a repeated call replaces the earlier entry harmlessly."""
    # imported here so that ``import usdet.data`` stays light (no torch) when nothing is registered
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets.coco import load_coco_json

    json_file = os.path.abspath(json_file)
    image_root = os.path.abspath(image_root)
    cat_ids, thing_classes = _categories(json_file)
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    # load_coco_json maps contiguous ids itself when categories are 1..K; keep the JSON's order.
    DatasetCatalog.register(name, lambda: load_coco_json(json_file, image_root, name))
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
