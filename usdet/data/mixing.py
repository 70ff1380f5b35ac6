"""Training on several sources: one class list reconciled by name, and sampling weights per source.

``DATASETS.TRAIN ("busi_train", "breast_train")`` concatenates the sources; with
``DATASETS.TRAIN_WEIGHTS (w1, w2)`` each training sample is drawn from source i with probability
``w_i / sum(w)`` (see ``usdet.data.loader.ResumableBatchSampler``), whatever the sources' sizes.

Classes are matched by name; the first training dataset sets the model's classes:
- identical names (in any order) or a subset of them map by name;
- a single-class ``lesion`` model accepts any source: every category of the others becomes
  ``lesion`` (e.g. BrEaST converted with ``--classes benign,malignant`` mixed into ``lesion`` BUSI);
- anything else (a ``lesion`` source into a benign/malignant model, an unknown name) is refused
  with a message naming both datasets and their classes, since no mapping by name exists.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["reconcile_classes", "load_training_sources", "check_train_weights"]

logger = logging.getLogger(__name__)

SINGLE_CLASS = ["lesion"]


def reconcile_classes(classes: Dict[str, Sequence[str]], names: Sequence[str]) -> Tuple[List[str], Dict[str, Optional[List[int]]]]:
    """The model's classes and, per dataset, a contiguous-id map to them (None = identity).

    ``classes``: dataset name -> its ``thing_classes``. Raises ``ValueError`` naming the dataset
    whose classes cannot be mapped by name (module docstring).
    """
    target = list(classes[names[0]])
    maps: Dict[str, Optional[List[int]]] = {}
    for name in names:
        own = list(classes[name])
        if own == target:
            maps[name] = None
        elif target == SINGLE_CLASS:
            maps[name] = [0] * len(own)
        elif set(own) <= set(target):
            maps[name] = [target.index(c) for c in own]
        else:
            unknown = [c for c in own if c not in target]
            raise ValueError(
                f"DATASETS.TRAIN: {name} has classes {own} but {names[0]} (the first training dataset, which sets "
                f"the model's classes) has {target}; {unknown} cannot be mapped by name. usdet maps identical "
                f"names, a subset of them, or any classes into a single-class ['lesion'] model: convert {name} "
                f"with the same --classes, or put a 'lesion' dataset first with MODEL.ROI_HEADS.NUM_CLASSES 1")
    return target, maps


def check_train_weights(names: Sequence[str], weights: Sequence[float]) -> Optional[List[float]]:
    """``DATASETS.TRAIN_WEIGHTS`` normalized to sum 1, or None when empty (plain concatenation)."""
    if not weights:
        return None
    if len(weights) != len(names):
        raise ValueError(f"DATASETS.TRAIN_WEIGHTS has {len(weights)} value(s) {list(weights)} for "
                         f"{len(names)} training dataset(s) {list(names)}: give one weight per dataset")
    if any(not (float(w) > 0) for w in weights):
        raise ValueError(f"DATASETS.TRAIN_WEIGHTS {list(weights)}: every weight must be positive "
                         "(drop a dataset from DATASETS.TRAIN instead of weighting it 0)")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def load_training_sources(names: Sequence[str], filter_empty: bool) -> Tuple[List[Dict[str, Any]], List[int]]:
    """Dataset dicts of every training dataset, classes reconciled, and the source index of each.

    One dataset: exactly ``get_detection_dataset_dicts`` (unchanged behaviour). Several: each is
    loaded alone (detectron2 would refuse different class lists outright), its annotations'
    ``category_id`` remapped by name, and the lists concatenated in ``DATASETS.TRAIN`` order.
    """
    from detectron2.data import MetadataCatalog, get_detection_dataset_dicts

    names = list(names)
    if len(names) == 1:
        dicts = get_detection_dataset_dicts(names, filter_empty=filter_empty)
        return dicts, [0] * len(dicts)
    target, maps = reconcile_classes({n: MetadataCatalog.get(n).thing_classes for n in names}, names)
    out: List[Dict[str, Any]] = []
    sources: List[int] = []
    for i, name in enumerate(names):
        dicts = get_detection_dataset_dicts([name], filter_empty=filter_empty)
        mapping = maps[name]
        if mapping is not None:
            logger.info("Training classes of %s %s mapped by name onto %s", name,
                        list(MetadataCatalog.get(name).thing_classes), target)
            for d in dicts:
                for a in d.get("annotations", []):
                    a["category_id"] = mapping[a["category_id"]]
        out.extend(dicts)
        sources.extend([i] * len(dicts))
    return out, sources
