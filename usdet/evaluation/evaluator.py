"""detectron2 ``DatasetEvaluator``s of the training-time evaluation: penalized IoU and COCO AP.

Both score against the same cleaned ground truth as the offline report
(:func:`usdet.evaluation.inputs.clean_gt` of the dataset's ``json_file``), and penalized IoU takes
detections in the form detectron2 writes them to ``coco_instances_results.json``, so a training-time
evaluation and ``--eval-only`` / ``tools/evaluate_json.py`` on its saved predictions give the same
numbers. Kept apart from the metrics so that offline scoring does not import detectron2 and torch.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.structures import BoxMode

from .inputs import build_detection_data, clean_gt, load_gt_json
from .penalized_iou import match_penalized_iou, penalized_iou_from_matches

logger = logging.getLogger(__name__)

__all__ = ["PenalizedIoUEvaluator", "CleanCOCOEvaluator", "evaluation_ground_truth"]

#: Evaluation parameters: configuration (``TEST.PIOU.*`` in the run's config.yaml and in
#: penalized_iou.json), not metrics, so they are kept out of the evaluator's results.
PIOU_PARAMS = ("score_thresh", "iou_thresh", "topk", "class_aware")


def evaluation_ground_truth(dataset_name: str) -> Dict[str, Any]:
    """The dataset's ground truth as a cleaned COCO dict (category ids as in its JSON).

    From the registered ``json_file`` (what the report reads), else from the ``DatasetCatalog``
    records (contiguous category ids); either way through the one cleaner.
    """
    meta = MetadataCatalog.get(dataset_name)
    json_file = meta.get("json_file", None)
    if json_file:
        return clean_gt(load_gt_json(json_file), json_file)[0]
    images, anns = [], []
    for rec in DatasetCatalog.get(dataset_name):
        images.append({k: rec[k] for k in ("image_id", "file_name", "width", "height") if k in rec})
        images[-1]["id"] = images[-1].pop("image_id")
        for a in rec.get("annotations", []):
            box = BoxMode.convert(list(a["bbox"]), a.get("bbox_mode", BoxMode.XYWH_ABS), BoxMode.XYWH_ABS)
            anns.append({"id": len(anns) + 1, "image_id": rec["image_id"], "bbox": [float(v) for v in box],
                         "category_id": int(a.get("category_id", 0)), "iscrowd": int(a.get("iscrowd", 0))})
    classes = meta.get("thing_classes", None) or [str(c) for c in sorted({a["category_id"] for a in anns} | {0})]
    cats = [{"id": i, "name": name} for i, name in enumerate(classes)]
    return clean_gt({"images": images, "annotations": anns, "categories": cats}, dataset_name)[0]


class CleanCOCOEvaluator(COCOEvaluator):
    """detectron2's ``COCOEvaluator`` scoring against the cleaned ground truth.

    detectron2 reads the registered JSON as is (degenerate boxes, unknown categories included);
    the report reads it through the one cleaner. This swaps the evaluator's COCO API for one built
    from the cleaned dict (crowd regions kept: pycocotools' own crowd matching applies).
    """

    def __init__(self, dataset_name: str, *args: Any, **kwargs: Any) -> None:
        has_json = bool(MetadataCatalog.get(dataset_name).get("json_file", None))
        super().__init__(dataset_name, *args, **kwargs)
        if has_json:
            from pycocotools.coco import COCO

            with contextlib.redirect_stdout(io.StringIO()):
                api = COCO()
                api.dataset = evaluation_ground_truth(dataset_name)
                api.createIndex()
            self._coco_api = api


class PenalizedIoUEvaluator(DatasetEvaluator):
    """detectron2 ``DatasetEvaluator`` returning ``{"piou": {...}}`` over the whole dataset.

    The study averaged the score over the last validation batch only; this evaluator gathers
    every image from every process first. Options come from ``cfg.TEST.PIOU.*`` unless given as
    keyword arguments. Truth: :func:`evaluation_ground_truth`, restricted to the images processed.
    The results hold metrics only; the options are written once, to ``penalized_iou.json``.
    """

    def __init__(
        self,
        dataset_name: str,
        cfg: Any = None,
        output_dir: Optional[str] = None,
        *,
        score_thresh: Optional[float] = None,
        iou_thresh: Optional[float] = None,
        topk: Optional[int] = None,
        class_aware: Optional[bool] = None,
        distributed: bool = True,
    ) -> None:
        opts = {"score_thresh": 0.45, "iou_thresh": 0.0, "topk": 1, "class_aware": False}
        piou_cfg = getattr(getattr(cfg, "TEST", None), "PIOU", None) if cfg is not None else None
        if piou_cfg is not None:
            opts.update(
                score_thresh=float(piou_cfg.SCORE_THRESH),
                iou_thresh=float(piou_cfg.IOU_THRESH),
                topk=int(piou_cfg.TOPK),
                class_aware=bool(piou_cfg.CLASS_AWARE),
            )
        for key, val in (
            ("score_thresh", score_thresh),
            ("iou_thresh", iou_thresh),
            ("topk", topk),
            ("class_aware", class_aware),
        ):
            if val is not None:
                opts[key] = val
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self._distributed = distributed
        self.score_thresh = float(opts["score_thresh"])
        self.iou_thresh = float(opts["iou_thresh"])
        self.topk = int(opts["topk"])
        self.class_aware = bool(opts["class_aware"])
        if self.topk < 1:
            raise ValueError(f"TEST.PIOU.TOPK must be >= 1, got {self.topk}")
        self._predictions: List[Dict[str, Any]] = []

    def reset(self) -> None:
        self._predictions = []

    def process(self, inputs: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, Any]]) -> None:
        for inp, out in zip(inputs, outputs):
            rec: Dict[str, Any] = {"image_id": inp["image_id"], "instances": []}
            inst = out.get("instances") if isinstance(out, Mapping) else None
            if inst is not None and len(inst):
                # Every detection (the ignore-region rule runs before the top-k), exactly as
                # COCOEvaluator writes them to coco_instances_results.json.
                rec["instances"] = instances_to_coco_json(inst.to("cpu"), inp["image_id"])
            self._predictions.append(rec)

    def evaluate(self) -> Dict[str, Any]:
        if self._distributed:
            from detectron2.utils import comm

            comm.synchronize()
            gathered = comm.gather(self._predictions, dst=0)
            if not comm.is_main_process():
                return {}
            predictions = list(itertools.chain(*gathered))
        else:
            predictions = self._predictions
        if not predictions:
            logger.warning("[PenalizedIoUEvaluator] did not receive valid predictions.")
            return {}
        image_ids = {p["image_id"] for p in predictions}
        gt = evaluation_ground_truth(self._dataset_name)
        known = {im["id"] for im in gt["images"]}
        if image_ids - known:
            logger.warning(
                "[PenalizedIoUEvaluator] %d processed image id(s) are not in dataset %s; ignored",
                len(image_ids - known),
                self._dataset_name,
            )
        gt = dict(gt, images=[im for im in gt["images"] if im["id"] in image_ids],
                  annotations=[a for a in gt["annotations"] if a["image_id"] in image_ids])
        # detectron2's contiguous class indices -> the JSON's category ids (as COCOEvaluator does)
        to_dataset = {v: k for k, v in (MetadataCatalog.get(self._dataset_name).get(
            "thing_dataset_id_to_contiguous_id", None) or {}).items()}
        preds = [dict(d, category_id=to_dataset.get(d["category_id"], d["category_id"]))
                 for p in predictions if p["image_id"] in known for d in p["instances"]]
        data = build_detection_data(gt, preds, check=False)
        m = match_penalized_iou(data, self.iou_thresh, self.topk, self.class_aware)
        res = penalized_iou_from_matches(m, self.score_thresh)
        res.pop("sweep", None)  # keep the flattened event-storage keys scalar
        params = {k: res.pop(k) for k in PIOU_PARAMS}
        if res["best_score_thresh"] is None:
            res["best_score_thresh"] = float("nan")
        logger.info(
            "Penalized IoU on %s (%d images): score=%.4f TP=%d FP=%d FN=%d TN=%d (s=%.2f, t=%.2f, k=%d)",
            self._dataset_name,
            data.num_images,
            res["score"],
            res["tp"],
            res["fp"],
            res["fn"],
            res["tn"],
            self.score_thresh,
            self.iou_thresh,
            self.topk,
        )
        if self._output_dir:
            from usdet.utils.io import atomic_write_json

            atomic_write_json(f"{self._output_dir}/penalized_iou.json",
                              {"dataset": self._dataset_name, "params": params, "piou": res})
        return {"piou": dict(res)}
