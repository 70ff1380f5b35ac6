"""Ignore regions (COCO ``iscrowd: 1``) in training: neither positives nor negatives.

An ignore region marks tissue a reader could not call (BrEaST's "other suspicious lesions"):
learning it as a lesion would be wrong, and learning it as background would teach the model to
score a possible lesion low. detectron2's ``DatasetMapper`` simply drops crowd annotations
(the region becomes background). usdet's mapper keeps them as instances with ``gt_ignore`` True
when the model is built with these heads; then
- the RPN matches anchors against the real boxes only, and an anchor lying mostly inside an
  ignore region (intersection >= half of the anchor's area, COCO's crowd rule) that would have
  been a negative is not sampled at all;
- the ROI heads do the same for proposals (and never add an ignore box as a ground-truth proposal).
Everything else is detectron2's ``RPN`` / ``StandardROIHeads``; with no ignore region they train
exactly as those do.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from detectron2.modeling import PROPOSAL_GENERATOR_REGISTRY, ROI_HEADS_REGISTRY
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.modeling.roi_heads import StandardROIHeads
from detectron2.modeling.sampling import subsample_labels
from detectron2.structures import Boxes, Instances, pairwise_ioa

__all__ = ["UsdetRPN", "UsdetROIHeads", "IGNORE_FIELD", "IGNORE_IOA", "split_ignored"]

IGNORE_FIELD = "gt_ignore"
IGNORE_IOA = 0.5  # a box is "inside" an ignore region when at least half of its area is


def split_ignored(instances: Instances) -> tuple:
    """(the real ground truth, the ignore-region boxes) of one image's training instances."""
    if not instances.has(IGNORE_FIELD):
        return instances, None
    ignore = instances.get(IGNORE_FIELD).bool()
    real = instances[~ignore]
    real.remove(IGNORE_FIELD)
    return real, instances.gt_boxes[ignore]


def inside_ignore(boxes: Boxes, ignore: Optional[Boxes]) -> Optional[torch.Tensor]:
    """Mask of ``boxes`` lying mostly inside any ignore region, or None when there is none."""
    if ignore is None or len(ignore) == 0:
        return None
    return (pairwise_ioa(ignore, boxes) >= IGNORE_IOA).any(dim=0)


@PROPOSAL_GENERATOR_REGISTRY.register()
class UsdetRPN(RPN):
    """detectron2's ``RPN``; anchors mostly inside an ignore region are never sampled as negatives."""

    @torch.jit.unused
    @torch.no_grad()
    def label_and_sample_anchors(self, anchors: List[Boxes], gt_instances: List[Instances]):
        all_anchors = Boxes.cat(anchors)
        real: List[Instances] = []
        self._pending: List[Optional[torch.Tensor]] = []
        for inst in gt_instances:
            r, ignore = split_ignored(inst)
            real.append(r)
            self._pending.append(inside_ignore(all_anchors, ignore))
        try:  # detectron2 samples image by image, in order: _subsample_labels takes the masks in turn
            return super().label_and_sample_anchors(anchors, real)
        finally:
            self._pending = []

    @torch.jit.unused
    def _subsample_labels(self, label: torch.Tensor) -> torch.Tensor:
        mask = self._pending.pop(0) if getattr(self, "_pending", None) else None
        if mask is not None:
            label = label.clone()
            label[mask & (label == 0)] = -1
        return super()._subsample_labels(label)


@ROI_HEADS_REGISTRY.register()
class UsdetROIHeads(StandardROIHeads):
    """detectron2's ``StandardROIHeads``; proposals mostly inside an ignore region are never background."""

    @torch.jit.unused
    @torch.no_grad()
    def label_and_sample_proposals(self, proposals: List[Instances], targets: List[Instances]):
        real: List[Instances] = []
        self._pending: List[Optional[torch.Tensor]] = []
        for props, inst in zip(proposals, targets):
            r, ignore = split_ignored(inst)
            real.append(r)
            mask = inside_ignore(props.proposal_boxes, ignore)
            if mask is not None and self.proposal_append_gt:  # detectron2 appends the real boxes last
                mask = torch.cat([mask, mask.new_zeros(len(r))])
            self._pending.append(mask)
        try:
            return super().label_and_sample_proposals(proposals, real)
        finally:
            self._pending = []

    @torch.jit.unused
    def _sample_proposals(self, matched_idxs: torch.Tensor, matched_labels: torch.Tensor,
                          gt_classes: torch.Tensor):
        mask = self._pending.pop(0) if getattr(self, "_pending", None) else None
        if mask is None:
            return super()._sample_proposals(matched_idxs, matched_labels, gt_classes)
        # Class per proposal (background = num_classes, -1 = not sampled), as detectron2 assigns
        # it, also for an image whose only annotations are ignore regions; then background
        # proposals inside an ignore region become "not sampled".
        background = self.num_classes
        if gt_classes.numel():
            classes = gt_classes[matched_idxs]
            classes[matched_labels == 0] = background
            classes[matched_labels == -1] = -1
        else:
            classes = torch.full_like(matched_idxs, background)
        classes[mask & (classes == background)] = -1
        fg, bg = subsample_labels(classes, self.batch_size_per_image, self.positive_fraction, background)
        sampled = torch.cat([fg, bg], dim=0)
        return sampled, classes[sampled]
