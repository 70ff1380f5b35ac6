"""Ignore regions (iscrowd 1) in training: kept by the mapper, never positives, and anchors/proposals
mostly inside one are never sampled as negatives (usdet.modeling.ignore_regions)."""
import numpy as np
import pytest
import torch

from train_helpers import quick_cfg

REAL, IGNORE = [8.0, 8.0, 48.0, 48.0], [64.0, 64.0, 124.0, 124.0]


def _grid(size=128, box=24, step=8):
    from detectron2.structures import Boxes

    xs = torch.arange(0, size - box + 1, step, dtype=torch.float32)
    x0, y0 = torch.meshgrid(xs, xs, indexing="xy")
    return Boxes(torch.stack([x0.flatten(), y0.flatten(), x0.flatten() + box, y0.flatten() + box], 1))


def _targets(real=True):
    from detectron2.structures import Boxes, Instances

    boxes = ([REAL] if real else []) + [IGNORE]
    t = Instances((128, 128))
    t.gt_boxes = Boxes(torch.tensor(boxes))
    t.gt_classes = torch.zeros(len(boxes), dtype=torch.int64)
    t.gt_ignore = torch.tensor([False] * real + [True])
    return t


def _inside_ignore(boxes):
    from detectron2.structures import Boxes, pairwise_ioa

    return (pairwise_ioa(Boxes(torch.tensor([IGNORE])), boxes) >= 0.5)[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from usdet.engine import Trainer

    return Trainer.build_model(quick_cfg(str(tmp_path_factory.mktemp("ign"))))


def test_mapper_keeps_ignore_regions_flagged_only_for_usdet_heads(tmp_path):
    import cv2
    from detectron2.structures import BoxMode

    from usdet.data.mapper import UsdetDatasetMapper

    path = str(tmp_path / "f.png")
    cv2.imwrite(path, np.full((128, 128, 3), 90, np.uint8))
    d = {"file_name": path, "height": 128, "width": 128, "image_id": 1, "annotations": [
        {"bbox": REAL, "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0, "iscrowd": 0},
        {"bbox": IGNORE, "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0, "iscrowd": 1}]}
    cfg = quick_cfg(str(tmp_path), "INPUT.AUG.HFLIP", "False")
    inst = UsdetDatasetMapper(cfg, is_train=True)(d)["instances"]
    assert inst.gt_ignore.tolist() == [False, True] and len(inst) == 2
    stock = quick_cfg(str(tmp_path), "MODEL.PROPOSAL_GENERATOR.NAME", "RPN", "MODEL.ROI_HEADS.NAME", "StandardROIHeads")
    inst = UsdetDatasetMapper(stock, is_train=True)(d)["instances"]
    assert len(inst) == 1 and not inst.has("gt_ignore")  # detectron2's behaviour: the region is background


def test_rpn_never_samples_anchors_inside_an_ignore_region(model):
    from detectron2.modeling.proposal_generator.rpn import RPN

    rpn = model.proposal_generator
    rpn.batch_size_per_image, rpn.positive_fraction = 10 ** 6, 0.5  # sample every anchor: nothing left to chance
    anchors = _grid()
    inside = _inside_ignore(anchors)
    assert int(inside.sum()) > 20
    labels, _ = rpn.label_and_sample_anchors([anchors], [_targets()])
    labels = labels[0]
    assert (labels[inside] == -1).all()  # neither negative nor positive
    assert int((labels == 1).sum()) > 0 and int((labels[~inside] == 0).sum()) > 100  # the rest trains as usual
    # detectron2's RPN, given the region as background (what its mapper does), samples them as negatives
    real_only = _targets()[torch.tensor([True, False])]
    stock, _ = RPN.label_and_sample_anchors(rpn, [anchors], [real_only])
    assert int((stock[0][inside] == 0).sum()) == int(inside.sum())
    # an image whose only annotation is an ignore region: no negative inside it either
    labels, _ = rpn.label_and_sample_anchors([anchors], [_targets(real=False)])
    assert (labels[0][inside] == -1).all() and (labels[0][~inside] == 0).all()


def test_roi_heads_never_sample_proposals_inside_an_ignore_region_as_background(model):
    from detectron2.structures import Instances
    from detectron2.utils.events import EventStorage

    heads = model.roi_heads
    heads.batch_size_per_image = 10 ** 6
    props = Instances((128, 128))
    props.proposal_boxes = _grid()
    props.objectness_logits = torch.zeros(len(props.proposal_boxes))
    with EventStorage():
        for real in (True, False):
            sampled = heads.label_and_sample_proposals([props], [_targets(real)])[0]
            inside = _inside_ignore(sampled.proposal_boxes)
            background = sampled.gt_classes == heads.num_classes
            assert not (background & inside).any()
            assert int(background.sum()) > 50
            fg = sampled[~background]
            if real:  # positives all belong to the real lesion (the ignore box is never added as a proposal)
                assert len(fg) > 0 and (fg.gt_boxes.tensor == torch.tensor(REAL)).all()
            else:
                assert len(fg) == 0


def test_training_step_with_ignore_regions_gives_finite_losses(model):
    from detectron2.utils.events import EventStorage

    model.train()
    batch = [{"image": torch.randint(0, 255, (3, 128, 128), dtype=torch.uint8), "instances": _targets(real)}
             for real in (True, False)]
    with EventStorage():
        losses = model(batch)
    assert set(losses) >= {"loss_rpn_cls", "loss_cls", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
