"""detectron2 ``DatasetEvaluator`` for penalized IoU (see :mod:`usdet.evaluation.penalized_iou`).

Kept apart from the metric itself so that offline scoring does not import detectron2 and torch;
``usdet.evaluation.penalized_iou.PenalizedIoUEvaluator`` still names this class.
"""
from __future__ import annotations

import itertools
import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
from detectron2.evaluation import DatasetEvaluator

from .inputs import build_detection_data
from .penalized_iou import match_penalized_iou, penalized_iou_from_matches

logger = logging.getLogger(__name__)

__all__ = ["PenalizedIoUEvaluator"]


class PenalizedIoUEvaluator(DatasetEvaluator):
    """detectron2 ``DatasetEvaluator`` returning ``{"piou": {...}}`` over the whole dataset.

    The study averaged the score over the last validation batch only; this evaluator gathers
    every image from every process first. Options come from ``cfg.TEST.PIOU.*`` unless given as
    keyword arguments. Truth comes from the dataset's ``DatasetCatalog`` records (crowd boxes
    left out), restricted to the images actually processed.
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
            rec: Dict[str, Any] = {"image_id": inp["image_id"]}
            inst = out.get("instances") if isinstance(out, Mapping) else None
            if inst is not None and len(inst):
                inst = inst.to("cpu")
                scores = inst.scores.numpy().astype(np.float64)
                # Only the top-k can ever be kept, at any threshold.
                keep = np.argsort(-scores, kind="stable")[: self.topk]
                xyxy = inst.pred_boxes.tensor.numpy().astype(np.float64)[keep]
                rec["boxes"] = np.c_[xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]]
                rec["scores"] = scores[keep]
                rec["classes"] = inst.pred_classes.numpy().astype(np.int64)[keep]
            self._predictions.append(rec)

    def _ground_truth(self, image_ids: set) -> Dict[Any, List[Dict[str, Any]]]:
        from detectron2.data import DatasetCatalog
        from detectron2.structures import BoxMode

        gts: Dict[Any, List[Dict[str, Any]]] = {}
        for rec in DatasetCatalog.get(self._dataset_name):
            if rec["image_id"] not in image_ids:
                continue
            anns = []
            for a in rec.get("annotations", []):
                if a.get("iscrowd", 0):
                    continue
                box = BoxMode.convert(list(a["bbox"]), a.get("bbox_mode", BoxMode.XYWH_ABS), BoxMode.XYWH_ABS)
                anns.append({"bbox": [float(v) for v in box], "category_id": int(a.get("category_id", 0))})
            gts[rec["image_id"]] = anns
        return gts

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
        gts = self._ground_truth(image_ids)
        missing = image_ids - set(gts)
        if missing:
            logger.warning(
                "[PenalizedIoUEvaluator] %d processed image id(s) are not in dataset %s; ignored",
                len(missing),
                self._dataset_name,
            )
        preds = []
        for p in predictions:
            if p["image_id"] not in gts or "boxes" not in p:
                continue
            for box, score, cls in zip(p["boxes"], p["scores"], p["classes"]):
                preds.append({"image_id": p["image_id"], "bbox": box.tolist(), "score": float(score), "category_id": int(cls)})
        data = build_detection_data(gts, preds, check=False)
        m = match_penalized_iou(data, self.iou_thresh, self.topk, self.class_aware)
        res = penalized_iou_from_matches(m, self.score_thresh)
        res.pop("sweep", None)  # keep the flattened event-storage keys scalar
        res.pop("class_aware", None)
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

            atomic_write_json(f"{self._output_dir}/penalized_iou.json", {"dataset": self._dataset_name, "piou": res})
        return {"piou": dict(res)}
