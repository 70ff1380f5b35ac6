"""Dataset dict -> model input, for usdet's training, validation-loss and test loaders.

Differs from detectron2's ``DatasetMapper`` in three ways that matter for ultrasound: images are
read by ``usdet.data.image_io`` (every odd export format, and a clear error naming the file),
the augmentations see the boxes (``AugInput.boxes``), so a random crop can keep lesions whole,
and ignore regions (``iscrowd: 1``) are kept, flagged ``gt_ignore``, for usdet's heads
(usdet.modeling.ignore_regions) instead of being dropped.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

from usdet.data.augment import build_augmentation
from usdet.data.image_io import read_image

__all__ = ["UsdetDatasetMapper"]


class UsdetDatasetMapper:
    """Callable mapping one detectron2 dataset dict to ``{"image": CHW tensor, "instances", ...}``.

    Args:
        cfg: the run's config (``INPUT.FORMAT``, ``INPUT.AUG``, sizes, ``MODEL.MASK_ON``).
        is_train: training augmentations and keep the annotations.
        augmentations: override the augmentation list (e.g. test-time resizing for the val loss).
        keep_annotations: keep ``instances`` even when not training (the val-loss loader needs them).
    """

    def __init__(self, cfg, is_train: bool = True, *, augmentations: Optional[List[T.Augmentation]] = None,
                 keep_annotations: Optional[bool] = None):
        self.is_train = is_train
        self.keep_annotations = is_train if keep_annotations is None else keep_annotations
        augs = build_augmentation(cfg, is_train) if augmentations is None else list(augmentations)
        self.augmentations = T.AugmentationList(augs)
        self.image_format = cfg.INPUT.FORMAT
        if self.image_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be RGB or BGR for usdet, got {self.image_format!r}")
        self.use_masks = bool(cfg.MODEL.MASK_ON)
        # Ignore regions (iscrowd 1) stay as instances flagged gt_ignore only for a model whose
        # heads honour them (usdet.modeling); otherwise they are dropped, i.e. background.
        self.keep_ignore = (cfg.MODEL.PROPOSAL_GENERATOR.NAME == "UsdetRPN"
                            and cfg.MODEL.ROI_HEADS.NAME == "UsdetROIHeads")
        self.mask_format = cfg.INPUT.MASK_FORMAT

    def __repr__(self) -> str:
        return f"UsdetDatasetMapper(is_train={self.is_train}, augmentations={self.augmentations})"

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        d = copy.deepcopy(dataset_dict)
        image = read_image(d["file_name"])  # RGB uint8; ImageReadError names the file
        if self.image_format == "BGR":
            image = image[:, :, ::-1]
        utils.check_image_size(d, image)

        annos = [a for a in d.pop("annotations", []) if self.keep_ignore or a.get("iscrowd", 0) == 0]
        boxes = None
        if annos:
            boxes = np.array([BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS) for a in annos],
                             dtype=np.float64).reshape(-1, 4)
        aug_input = T.AugInput(image, boxes=boxes)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        h, w = image.shape[:2]
        d["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if not self.keep_annotations:
            return d
        if not self.use_masks:
            for a in annos:
                a.pop("segmentation", None)
        annos = [utils.transform_instance_annotations(a, transforms, (h, w)) for a in annos]
        instances = utils.annotations_to_instances(annos, (h, w), mask_format=self.mask_format)
        if self.keep_ignore:
            instances.gt_ignore = torch.tensor([bool(a.get("iscrowd", 0)) for a in annos], dtype=torch.bool)
        d["instances"] = utils.filter_empty_instances(instances)
        return d
