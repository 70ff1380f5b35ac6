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

from usdet.data.augment import build_augmentation, mosaic_2x2, paste_lesion
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
        # Multi-image augmentations (training only): they need the training pool (set_pool).
        aug = cfg.INPUT.AUG
        self.mosaic_prob = float(aug.MOSAIC.PROB) if is_train and aug.MOSAIC.ENABLED else 0.0
        self.paste_prob = float(aug.COPY_PASTE.PROB) if is_train and aug.COPY_PASTE.ENABLED else 0.0
        self.paste_scale = tuple(aug.COPY_PASTE.SCALE)
        self.mosaic_augmentations = None
        if self.mosaic_prob > 0 and augmentations is None:
            # The 2x2 canvas is resized CANVAS_SCALE times larger than a single image (tiles then
            # appear at CANVAS_SCALE / 2 of their usual scale); no random crop on top of it.
            mcfg = cfg.clone()
            mcfg.defrost()
            f = float(aug.MOSAIC.CANVAS_SCALE)
            mcfg.INPUT.MIN_SIZE_TRAIN = tuple(int(round(v * f)) for v in cfg.INPUT.MIN_SIZE_TRAIN)
            mcfg.INPUT.MAX_SIZE_TRAIN = int(round(cfg.INPUT.MAX_SIZE_TRAIN * f))
            mcfg.INPUT.AUG.RANDOM_RESIZED_CROP.ENABLED = False
            self.mosaic_augmentations = T.AugmentationList(build_augmentation(mcfg, True))
        if self.use_masks and (self.mosaic_prob > 0 or self.paste_prob > 0):
            raise ValueError("INPUT.AUG.MOSAIC / COPY_PASTE keep boxes only: not usable with MODEL.MASK_ON")
        self._pool: List[Dict[str, Any]] = []
        self._donors: List[tuple] = []

    def set_pool(self, dataset_dicts: List[Dict[str, Any]]) -> None:
        """The training dicts that mosaic draws partners from and copy-paste draws lesions from."""
        self._pool = list(dataset_dicts)
        self._donors = [(i, j) for i, d in enumerate(self._pool) for j, a in enumerate(d.get("annotations", []))
                        if not a.get("iscrowd", 0)]

    def _load(self, d: Dict[str, Any]):
        """The image (INPUT.FORMAT) and its kept annotations, boxes as XYXY_ABS."""
        image = read_image(d["file_name"])  # RGB uint8; ImageReadError names the file
        if self.image_format == "BGR":
            image = image[:, :, ::-1]
        utils.check_image_size(d, image)
        annos = []
        for a in d.get("annotations", []):
            if self.keep_ignore or a.get("iscrowd", 0) == 0:
                a = dict(a)
                a["bbox"] = BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS)
                a["bbox_mode"] = BoxMode.XYXY_ABS
                annos.append(a)
        return np.ascontiguousarray(image), annos

    def _compose(self, image: np.ndarray, annos: List[Dict[str, Any]]):
        """Mosaic (with MOSAIC.PROB) or else lesion copy-paste (with COPY_PASTE.PROB); np.random only."""
        if self.mosaic_prob > 0 and self._pool and np.random.rand() < self.mosaic_prob:
            others = [self._load(self._pool[int(np.random.randint(len(self._pool)))]) for _ in range(3)]
            image, annos = mosaic_2x2([(image, annos)] + others)
            return image, annos, self.mosaic_augmentations
        if self.paste_prob > 0 and self._donors and np.random.rand() < self.paste_prob:
            i, j = self._donors[int(np.random.randint(len(self._donors)))]
            donor, donor_annos = self._load(self._pool[i])
            k = sum(1 for a in self._pool[i]["annotations"][:j] if self.keep_ignore or a.get("iscrowd", 0) == 0)
            image, annos = paste_lesion(image, annos, donor, donor_annos[k], scale=self.paste_scale)
        return image, annos, self.augmentations

    def __repr__(self) -> str:
        return f"UsdetDatasetMapper(is_train={self.is_train}, augmentations={self.augmentations})"

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        d = copy.deepcopy(dataset_dict)
        image, annos = self._load(d)
        d.pop("annotations", None)
        augmentations = self.augmentations
        if self.is_train and (self.mosaic_prob > 0 or self.paste_prob > 0):
            image, annos, augmentations = self._compose(image, annos)
            d["height"], d["width"] = image.shape[:2]
        boxes = np.array([a["bbox"] for a in annos], dtype=np.float64).reshape(-1, 4) if annos else None
        aug_input = T.AugInput(image, boxes=boxes)
        transforms = augmentations(aug_input)
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
