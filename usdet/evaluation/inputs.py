"""Ground truth and predictions as flat numpy arrays, checked once for every metric.

Every metric in ``usdet.evaluation`` (penalized IoU, FROC, image-level ROC, COCO AP bootstrap)
works on the same :class:`DetectionData`: boxes in ``[x, y, w, h]`` absolute pixels, one row per
box, and an image index per row. Loading and checking the inputs lives here so that a bad file
is reported once, clearly (file name and problem), and the valid rest is still scored.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from usdet.data.coco_clean import clean_coco

from .matching import box_iou_xywh, in_ignore_region

logger = logging.getLogger(__name__)

__all__ = [
    "DetectionData",
    "EvaluationInputError",
    "load_gt_json",
    "build_detection_data",
    "PredictionArrays",
    "clean_coco",
    "clean_gt",
    "clean_predictions",
    "coco_with_index_ids",
    "box_iou_xywh",
]


class EvaluationInputError(ValueError):
    """A ground-truth or prediction input that cannot be evaluated at all (names the file)."""


@dataclass
class DetectionData:
    """Truth and predictions of one evaluation set as arrays (indices refer to ``image_ids``)."""

    image_ids: np.ndarray  # (N,) int64, dataset order
    gt_boxes: np.ndarray  # (G, 4) float64 xywh, annotation order within an image
    gt_image: np.ndarray  # (G,) int64 index into image_ids
    gt_classes: np.ndarray  # (G,) int64 category ids
    pred_boxes: np.ndarray  # (P, 4) float64 xywh
    pred_image: np.ndarray  # (P,) int64 index into image_ids
    pred_scores: np.ndarray  # (P,) float64
    pred_classes: np.ndarray  # (P,) int64 category ids
    categories: Dict[int, str] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)
    # Ignore regions (COCO iscrowd): never lesions; detections inside them are already removed.
    ignore_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))  # (I, 4) xywh
    ignore_image: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # (I,)
    num_ignored_predictions: int = 0  # detections removed by the ignore-region rule

    @property
    def num_images(self) -> int:
        return int(len(self.image_ids))

    def gt_count_per_image(self) -> np.ndarray:
        return np.bincount(self.gt_image, minlength=self.num_images)


@contextlib.contextmanager
def gc_paused():
    """Pause Python's cyclic GC while building millions of small dicts/lists (2-5x faster).

    Nothing built here has reference cycles; the collector would only rescan them repeatedly.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _warn(warnings: List[str], message: str) -> None:
    warnings.append(message)
    logger.warning(message)


def load_gt_json(path: str) -> Dict[str, Any]:
    """Read a COCO ground-truth file; raise :class:`EvaluationInputError` naming it if unusable."""
    if not os.path.isfile(path):
        raise EvaluationInputError(f"{path}: ground-truth file not found")
    try:
        with open(path, "r", encoding="utf-8") as fh:
            gt = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvaluationInputError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(gt, dict):
        raise EvaluationInputError(f"{path}: expected a COCO object with 'images', got {type(gt).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in gt:
            raise EvaluationInputError(f"{path}: missing top-level key '{key}' (not a COCO ground-truth file)")
        if not isinstance(gt[key], list):
            raise EvaluationInputError(f"{path}: '{key}' must be a list")
    if not gt["images"]:
        raise EvaluationInputError(f"{path}: no images")
    if not gt["categories"]:
        raise EvaluationInputError(f"{path}: no categories")
    return gt


def load_predictions_json(path: str) -> List[Dict[str, Any]]:
    """Read a detectron2 ``coco_instances_results.json`` (a list of detections)."""
    if not os.path.isfile(path):
        raise EvaluationInputError(f"{path}: prediction file not found")
    try:
        with open(path, "r", encoding="utf-8") as fh, gc_paused():
            preds = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvaluationInputError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(preds, list):
        raise EvaluationInputError(
            f"{path}: expected a list of detections {{image_id, category_id, bbox, score}}, "
            f"got {type(preds).__name__}"
        )
    return preds


def _finite_box(b: Any) -> Optional[List[float]]:
    if not isinstance(b, (list, tuple)) or len(b) != 4:
        return None
    try:
        out = [float(v) for v in b]
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in out):
        return None
    return out


def clean_gt(gt: Dict[str, Any], source: str = "ground truth") -> Tuple[Dict[str, Any], List[str]]:
    """:func:`clean_coco` for evaluation (no image files needed); each message is also logged."""
    cleaned, messages = clean_coco(gt, source)
    for m in messages:
        logger.warning(m)
    return cleaned, messages


@dataclass
class PredictionArrays:
    """Scorable detections as arrays (rows in input order)."""

    image_index: np.ndarray  # (P,) index into the ground truth's image list
    image_ids: np.ndarray  # (P,) original image ids
    category_ids: np.ndarray  # (P,) int64
    boxes: np.ndarray  # (P, 4) float64 xywh
    scores: np.ndarray  # (P,) float64

    def __len__(self) -> int:
        return int(len(self.scores))

    def to_coco(self, index_ids: bool = False) -> List[Dict[str, Any]]:
        """Fresh COCO result dicts (the COCO API adds keys to them).

        ``index_ids`` numbers images 1..N in ground-truth order (see :func:`coco_with_index_ids`).
        Each dict carries an empty ``segmentation`` so that the COCO API does not build a polygon
        per detection (box AP never reads it).
        """
        no_polygon: List[Any] = []
        ids = (self.image_index + 1).tolist() if index_ids else self.image_ids.tolist()
        with gc_paused():
            return [
                {"image_id": i, "category_id": c, "bbox": b, "score": s, "segmentation": no_polygon}
                for i, c, b, s in zip(ids, self.category_ids.tolist(), self.boxes.tolist(), self.scores.tolist())
            ]


def coco_with_index_ids(gt: Dict[str, Any]) -> Dict[str, Any]:
    """A copy of a (cleaned) COCO dict whose images are numbered 1..N in file order.

    COCO evaluators require integer image ids; detectron2 datasets may use any hashable id.
    """
    index = {im["id"]: k + 1 for k, im in enumerate(gt["images"])}
    out = dict(gt)
    out["images"] = [dict(im, id=index[im["id"]]) for im in gt["images"]]
    out["annotations"] = [dict(a, image_id=index[a["image_id"]]) for a in gt["annotations"]]
    return out


def _report(warnings: List[str], source: str, problems: Dict[str, List[Any]]) -> None:
    for problem, items in problems.items():
        uniq = list(dict.fromkeys(repr(x) if isinstance(x, (list, dict)) else x for x in items))
        shown = ", ".join(str(x) for x in uniq[:5]) + (" ..." if len(uniq) > 5 else "")
        _warn(warnings, f"{source}: ignored {len(items)} detection(s) with {problem} ({shown})")


def _columns(preds: Sequence[Any], default_cat: Optional[int]):
    """Fast path: every entry a dict with the keys and a 4-number bbox (else raise)."""
    img = [p["image_id"] for p in preds]
    score = np.asarray([p["score"] for p in preds], dtype=np.float64)
    boxes = np.asarray([p["bbox"] for p in preds], dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError("ragged bbox")
    if default_cat is None:
        cat = [p["category_id"] for p in preds]
    else:
        cat = [p.get("category_id", default_cat) for p in preds]
    return img, cat, boxes.reshape(-1, 4), score.reshape(-1)


def _lookup(table: Dict[Any, int], keys: List[Any]) -> np.ndarray:
    """``table[key]`` for each key, -1 where absent or unhashable (e.g. a list given as an id)."""
    try:
        return np.fromiter((table.get(k, -1) for k in keys), dtype=np.int64, count=len(keys))
    except TypeError:

        def get(k: Any) -> int:
            try:
                return table.get(k, -1)
            except TypeError:
                return -1

        return np.fromiter((get(k) for k in keys), dtype=np.int64, count=len(keys))


def clean_predictions(
    preds: Sequence[Any], image_ids: Sequence[Any], cat_ids: Sequence[int], source: str = "predictions"
) -> Tuple[PredictionArrays, List[str]]:
    """Keep detections that can be scored; report (file + problem + count) and drop the rest.

    A missing ``category_id`` is allowed only when the ground truth has a single category.
    """
    warnings: List[str] = []
    index = {iid: k for k, iid in enumerate(image_ids)}
    known_cats = set(cat_ids)
    default_cat = next(iter(known_cats)) if len(known_cats) == 1 else None
    problems: Dict[str, List[Any]] = {}
    try:
        with gc_paused():
            img, cat, boxes, scores = _columns(preds, default_cat)
        rows = np.arange(len(preds))
    except (KeyError, TypeError, ValueError, IndexError):
        # Slow path: find the malformed entries one by one.
        img, cat, box_list, score_list, row_list = [], [], [], [], []
        for i, p in enumerate(preds):
            if not isinstance(p, dict):
                problems.setdefault("entries that are not objects", []).append(i)
                continue
            need = ("image_id", "bbox", "score") + (() if default_cat is not None else ("category_id",))
            missing = [k for k in need if k not in p]
            if missing:
                problems.setdefault(f"missing key(s) {'/'.join(missing)}", []).append(i)
                continue
            box = _finite_box(p["bbox"])
            if box is None and not (isinstance(p["bbox"], (list, tuple)) and len(p["bbox"]) == 4):
                problems.setdefault("bbox that is not 4 numbers", []).append(i)
                continue
            try:
                s = float(p["score"])
            except (TypeError, ValueError):
                s = float("nan")
            img.append(p["image_id"])
            cat.append(p.get("category_id", default_cat))
            box_list.append(box if box is not None else [float("nan")] * 4)
            score_list.append(s)
            row_list.append(i)
        boxes = np.asarray(box_list, dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(score_list, dtype=np.float64)
        rows = np.asarray(row_list, dtype=np.int64)
    n = len(img)
    img_idx = _lookup(index, img)
    cat_list = sorted(known_cats)
    cat_idx = _lookup({c: k for k, c in enumerate(cat_list)}, cat)
    cat_ok = cat_idx >= 0
    keep = np.ones(n, dtype=bool)
    checks = [
        (img_idx < 0, "unknown image_id (not in the ground truth)", lambda k: img[k]),
        (~cat_ok, "unknown category_id", lambda k: cat[k]),
        (~np.isfinite(boxes).all(1), "bbox that is not 4 finite numbers", lambda k: int(rows[k])),
        ((boxes[:, 2] < 0) | (boxes[:, 3] < 0), "bbox with negative width or height", lambda k: int(rows[k])),
        (~np.isfinite(scores), "non-finite score", lambda k: int(rows[k])),
    ]
    for bad, problem, label in checks:
        bad = bad & keep
        if bad.any():
            problems.setdefault(problem, []).extend(label(k) for k in np.flatnonzero(bad))
            keep &= ~bad
    _report(warnings, source, problems)
    kept = np.flatnonzero(keep)
    gt_ids = np.empty(len(image_ids), dtype=object)
    gt_ids[:] = list(image_ids)
    arrays = PredictionArrays(
        image_index=img_idx[kept],
        image_ids=gt_ids[img_idx[kept]],
        category_ids=np.asarray(cat_list, dtype=np.int64)[cat_idx[kept]],
        boxes=boxes[kept],
        scores=scores[kept],
    )
    return arrays, warnings


GtLike = Union[Mapping[str, Any], Mapping[Any, Sequence[Any]], "DetectionData"]


def build_detection_data(
    gt: GtLike,
    preds: Union[Sequence[Mapping[str, Any]], "PredictionArrays"] = (),
    *,
    check: bool = True,
    source_gt: str = "ground truth",
    source_pred: str = "predictions",
) -> DetectionData:
    """Arrays from a COCO dict (``images``/``annotations``/``categories``) or ``{image_id: [ann, ...]}``.

    ``preds`` are COCO results ``{image_id, category_id, bbox, score}``. With ``check`` (default),
    unusable entries are dropped and reported in ``.warnings``. Crowd truth boxes become ignore
    regions, and detections inside them are removed (:func:`usdet.evaluation.matching.in_ignore_region`).
    """
    warnings: List[str] = []
    if isinstance(gt, Mapping) and "images" in gt and "annotations" in gt:
        coco = dict(gt)
        coco.setdefault("categories", [])
        if not coco["categories"]:
            ids = sorted({a.get("category_id", 1) for a in coco["annotations"]} | {1})
            coco["categories"] = [{"id": c, "name": str(c)} for c in ids]
    elif isinstance(gt, Mapping):
        images, anns = [], []
        for img_id, items in gt.items():
            images.append({"id": img_id})
            for a in items:
                if isinstance(a, Mapping):
                    anns.append(dict(a, image_id=img_id))
                else:  # a bare [x, y, w, h]
                    anns.append({"image_id": img_id, "bbox": list(a), "category_id": 1})
        seen = {a.get("category_id", 1) for a in anns}
        if not isinstance(preds, PredictionArrays):
            seen |= {p.get("category_id", 1) for p in preds if isinstance(p, Mapping)}
        cat_ids = sorted({c for c in seen if isinstance(c, (int, np.integer))} | {1})
        for a in anns:
            a.setdefault("category_id", 1)
        coco = {"images": images, "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in cat_ids]}
    else:
        raise TypeError(f"ground truth must be a COCO dict or {{image_id: annotations}}, got {type(gt).__name__}")
    if check:
        coco, w = clean_gt(coco, source_gt)
        warnings += w
    image_ids = [im["id"] for im in coco["images"]]
    index = {iid: k for k, iid in enumerate(image_ids)}
    cats = {c["id"]: str(c.get("name", c["id"])) for c in coco["categories"]}
    if isinstance(preds, PredictionArrays):
        arr = preds
    else:
        arr, w = clean_predictions(preds, image_ids, list(cats), source_pred)
        if check:
            warnings += w
    anns = [a for a in coco["annotations"] if not a.get("iscrowd", 0)]
    gt_boxes = np.asarray([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
    gt_image = np.asarray([index[a["image_id"]] for a in anns], dtype=np.int64)
    gt_classes = np.asarray([a["category_id"] for a in anns], dtype=np.int64)
    # Stable sort by image keeps the annotation order inside each image (tie rule of the matching).
    order = np.argsort(gt_image, kind="stable")
    gt_boxes, gt_image, gt_classes = gt_boxes[order], gt_image[order], gt_classes[order]
    crowd = [a for a in coco["annotations"] if a.get("iscrowd", 0)]
    ign_boxes = np.asarray([a["bbox"] for a in crowd], dtype=np.float64).reshape(-1, 4)
    ign_image = np.asarray([index[a["image_id"]] for a in crowd], dtype=np.int64)
    # The one ignore-region rule, before any score (see usdet.evaluation.matching).
    drop = in_ignore_region(arr.image_index, arr.scores, arr.boxes, gt_image, gt_boxes, ign_image, ign_boxes,
                            len(image_ids))
    keep = ~drop
    return DetectionData(
        image_ids=np.asarray(image_ids),
        gt_boxes=gt_boxes,
        gt_image=gt_image,
        gt_classes=gt_classes,
        pred_boxes=arr.boxes[keep],
        pred_image=arr.image_index[keep],
        pred_scores=arr.scores[keep],
        pred_classes=arr.category_ids[keep],
        categories=cats,
        warnings=warnings,
        ignore_boxes=ign_boxes,
        ignore_image=ign_image,
        num_ignored_predictions=int(drop.sum()),
    )


def flatten_instances_predictions(preds: Sequence[Any]) -> List[Dict[str, Any]]:
    """Accept detectron2's ``instances_predictions.pth`` layout (``[{image_id, instances: [...]}]``) too."""
    if preds and isinstance(preds[0], dict) and "instances" in preds[0]:
        out: List[Dict[str, Any]] = []
        for p in preds:
            for inst in p.get("instances", []):
                out.append(dict(inst, image_id=inst.get("image_id", p.get("image_id"))))
        return out
    return list(preds)


@dataclass
class EvaluationInputs:
    """A ground truth and its detections, read and checked once (see :func:`load_inputs`)."""

    gt: Dict[str, Any]  # the cleaned COCO dict
    predictions: PredictionArrays  # the scorable detections
    data: DetectionData
    warnings: List[str]  # one message per problem, naming the file
    num_raw_predictions: int  # detections in the input, scorable or not
    gt_name: str
    pred_name: str


def load_inputs(
    gt: Union[str, Dict[str, Any]],
    predictions: Union[str, Sequence[Any]],
    gt_name: str = "ground truth",
    pred_name: str = "predictions",
) -> EvaluationInputs:
    """Read (paths) or take (loaded) a COCO ground truth and its detections, and check both.

    The one reader of the report, the comparison, subgroups and the operating point, so that
    every figure counts the same images, boxes and detections. A path replaces its ``*_name``.
    """
    if isinstance(gt, str):
        gt_name = gt
        gt = load_gt_json(gt)
    if isinstance(predictions, str):
        pred_name = predictions
        predictions = load_predictions_json(predictions)
    raw = flatten_instances_predictions(list(predictions))
    gt_clean, warnings = clean_gt(gt, gt_name)
    arrays, w = clean_predictions(raw, [im["id"] for im in gt_clean["images"]],
                                  [c["id"] for c in gt_clean["categories"]], pred_name)
    data = build_detection_data(gt_clean, arrays, check=False)
    return EvaluationInputs(gt_clean, arrays, data, warnings + w, len(raw), gt_name, pred_name)


def load_detection_data(
    gt: Any, predictions: Any, gt_name: str = "ground truth", pred_name: str = "predictions"
) -> Tuple[Dict[str, Any], DetectionData, List[str]]:
    """(cleaned COCO ground truth, arrays, input problems) from a GT path/dict and a results path/list."""
    x = load_inputs(gt, predictions, gt_name, pred_name)
    return x.gt, x.data, x.warnings


__all__ += ["flatten_instances_predictions", "EvaluationInputs", "load_inputs", "load_detection_data",
            "load_predictions_json"]
