"""Ultrasound augmentations and usdet's dataset mapper."""
import os

import numpy as np
import pytest
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

from train_helpers import QUICK_CFG


def _cfg(*opts):
    from usdet.engine import build_config

    return build_config(QUICK_CFG, list(opts))


ALL_ON = ["INPUT.AUG.VFLIP", "True", "INPUT.AUG.BRIGHTNESS", "0.2", "INPUT.AUG.CONTRAST", "0.2",
          "INPUT.AUG.GAMMA", "0.3", "INPUT.AUG.SPECKLE", "0.1", "INPUT.AUG.RANDOM_RESIZED_CROP.ENABLED", "True"]


def test_build_augmentation_lists():
    from usdet.data.augment import RandomGamma, RandomResizedCropKeepBoxes, RandomSpeckle, build_augmentation

    test = build_augmentation(_cfg(), is_train=False)
    assert [type(a) for a in test] == [T.ResizeShortestEdge]
    assert test[0].short_edge_length == (128, 128) and test[0].max_size == 160
    train = build_augmentation(_cfg(), is_train=True)
    assert [type(a) for a in train] == [T.ResizeShortestEdge, T.RandomFlip]
    assert train[0].short_edge_length == (96, 112, 128) and train[0].is_range is False
    full = build_augmentation(_cfg(*ALL_ON), is_train=True)
    assert [type(a) for a in full] == [RandomResizedCropKeepBoxes, T.ResizeShortestEdge, T.RandomFlip,
                                       T.RandomFlip, T.RandomBrightness, T.RandomContrast, RandomGamma,
                                       RandomSpeckle]
    assert full[3].vertical and not full[2].vertical
    assert build_augmentation(_cfg("INPUT.AUG.HFLIP", "False"), True)[1:] == []


def test_random_resized_crop_keeps_every_box_whole():
    from usdet.data.augment import RandomResizedCropKeepBoxes

    aug = RandomResizedCropKeepBoxes(scale=(0.3, 0.9), ratio=(0.75, 1.333), prob=1.0, keep_boxes=True)
    image = np.zeros((160, 200, 3), np.uint8)
    rng = np.random.default_rng(0)
    crops = 0
    for seed in range(300):
        np.random.seed(seed)
        x0, y0 = rng.uniform(0, 150), rng.uniform(0, 110)
        boxes = np.array([[x0, y0, x0 + rng.uniform(5, 45), y0 + rng.uniform(5, 45)]])
        tfm = aug.get_transform(image, boxes)
        if isinstance(tfm, T.NoOpTransform):
            continue
        crops += 1
        assert isinstance(tfm, T.CropTransform)
        assert 0.3 * 0.9 <= tfm.w * tfm.h / (200 * 160) <= 0.9 * 1.1
        out = tfm.apply_box(boxes)
        assert (out[:, :2] >= 0).all() and (out[:, 2] <= tfm.w).all() and (out[:, 3] <= tfm.h).all()
        assert np.allclose(out[:, 2:] - out[:, :2], boxes[:, 2:] - boxes[:, :2])  # not cut
    assert crops > 150
    # prob 0 never crops; an image without boxes may crop anywhere.
    assert isinstance(RandomResizedCropKeepBoxes(prob=0.0).get_transform(image, None), T.NoOpTransform)
    np.random.seed(1)
    assert isinstance(aug.get_transform(image, None), T.CropTransform)
    with pytest.raises(ValueError, match="SCALE"):
        RandomResizedCropKeepBoxes(scale=(0.0, 1.2))


def test_gamma_and_speckle_transforms():
    from usdet.data.augment import GammaTransform, RandomGamma, RandomSpeckle, SpeckleTransform

    grey = np.repeat(np.linspace(0, 255, 64 * 64).reshape(64, 64, 1), 3, axis=2).astype(np.uint8)
    assert np.array_equal(GammaTransform(1.0).apply_image(grey), grey)
    brighter = GammaTransform(0.5).apply_image(grey)
    assert brighter[32, 32, 0] > grey[32, 32, 0] and brighter[0, 0, 0] == 0 and brighter[-1, -1, 0] == 255
    coords = np.array([[3.0, 4.0]])
    assert np.array_equal(GammaTransform(0.7).apply_coords(coords), coords)

    flat = np.full((64, 64, 3), 120, np.uint8)
    a, b = SpeckleTransform(0.2, 7).apply_image(flat), SpeckleTransform(0.2, 7).apply_image(flat)
    assert np.array_equal(a, b) and not np.array_equal(a, SpeckleTransform(0.2, 8).apply_image(flat))
    assert np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 1], a[..., 2])  # stays grey
    assert abs(float(a.mean()) - 120) < 3 and 15 < float(a.std()) < 35  # mean kept, ~20% spread
    np.random.seed(0)
    assert 0.7 <= RandomGamma(0.3).get_transform(flat).gamma <= 1.3
    assert isinstance(RandomSpeckle(0.1).get_transform(flat), SpeckleTransform)
    with pytest.raises(ValueError, match="GAMMA"):
        RandomGamma(1.5)


def _phantom_dicts(phantom_dataset, split="train"):
    from detectron2.data.datasets.coco import load_coco_json

    return load_coco_json(os.path.join(phantom_dataset, "annotations", f"{split}.json"), phantom_dataset)


def test_mapper_boxes_stay_inside_and_follow_the_seed(phantom_dataset):
    from usdet.data.mapper import UsdetDatasetMapper

    dicts = _phantom_dicts(phantom_dataset)
    mapper = UsdetDatasetMapper(_cfg(*ALL_ON, "MODEL.ROI_HEADS.NUM_CLASSES", "2"), is_train=True)
    negatives = 0
    for d in dicts:
        np.random.seed(3)
        out = mapper(d)
        np.random.seed(3)
        again = mapper(d)
        assert np.array_equal(out["image"].numpy(), again["image"].numpy())
        c, h, w = out["image"].shape
        assert c == 3 and (min(h, w) in (96, 112, 128) or max(h, w) == 160)
        boxes = out["instances"].gt_boxes.tensor.numpy()
        assert len(boxes) == len(d["annotations"])  # crops keep every lesion
        negatives += len(boxes) == 0
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert "annotations" in d and "image" not in d  # the input dict is not modified
    assert negatives >= 1  # lesion-free frames are kept and map to empty instances


def test_mapper_without_augmentation_matches_the_annotations(phantom_dataset):
    from usdet.data.mapper import UsdetDatasetMapper

    d = next(d for d in _phantom_dicts(phantom_dataset) if d["annotations"])
    cfg = _cfg("INPUT.AUG.HFLIP", "False", "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.FORMAT", "RGB")
    out = UsdetDatasetMapper(cfg, is_train=True)(d)
    scale = out["image"].shape[1] / d["height"]
    want = np.array([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in d["annotations"]])
    assert np.allclose(out["instances"].gt_boxes.tensor.numpy(), want * scale, atol=1e-3)
    assert out["instances"].gt_classes.tolist() == [a["category_id"] for a in d["annotations"]]
    test_out = UsdetDatasetMapper(cfg, is_train=False)(d)
    assert "instances" not in test_out
    val_out = UsdetDatasetMapper(cfg, is_train=False, keep_annotations=True)(d)
    assert len(val_out["instances"]) == len(d["annotations"])


def test_mapper_unreadable_image_names_the_file(tmp_path):
    from usdet.data.image_io import ImageReadError
    from usdet.data.mapper import UsdetDatasetMapper

    bad = tmp_path / "frame.png"
    bad.write_bytes(b"")
    d = {"file_name": str(bad), "height": 10, "width": 10, "image_id": 1, "annotations": []}
    with pytest.raises(ImageReadError, match="frame.png: zero-byte file"):
        UsdetDatasetMapper(_cfg(), is_train=True)(d)


# ---- multi-image augmentations (issue 21): mosaic and lesion copy-paste -----------------------

def _marked(h, w, boxes, value):
    """A black image whose box interiors are filled with ``value``: box content is then traceable."""
    img = np.zeros((h, w, 3), np.uint8)
    for x0, y0, x1, y1 in boxes:
        img[int(y0):int(y1), int(x0):int(x1)] = value
    return img


def test_mosaic_keeps_every_box_and_ignore_region_exact():
    from usdet.data.augment import mosaic_2x2

    rng = np.random.default_rng(1)
    for seed in range(20):
        np.random.seed(seed)
        samples, expected_values = [], []
        for k in range(4):
            h, w = int(rng.integers(60, 140)), int(rng.integers(60, 140))
            x0, y0 = float(rng.integers(0, w // 2)), float(rng.integers(0, h // 2))
            box = [x0, y0, x0 + w // 3, y0 + h // 3]
            annos = [{"bbox": box, "bbox_mode": BoxMode.XYXY_ABS, "category_id": k % 2, "iscrowd": int(k == 3)}]
            samples.append((_marked(h, w, [box], 40 + 50 * k), annos))
            expected_values.append(40 + 50 * k)
        canvas, annos = mosaic_2x2(samples)
        h0, w0 = samples[0][0].shape[:2]
        assert canvas.shape == (2 * h0, 2 * w0, 3)
        assert len(annos) == 4 and [a["iscrowd"] for a in annos] == [0, 0, 0, 1]
        assert [a["category_id"] for a in annos] == [0, 1, 0, 1]
        for k, a in enumerate(annos):
            x0, y0, x1, y1 = a["bbox"]
            assert 0 <= x0 < x1 <= 2 * w0 and 0 <= y0 < y1 <= 2 * h0
            # the box lies in its own quarter and its interior carries its image's mark
            qy, qx = k // 2, k % 2
            assert qx * w0 <= x0 and x1 <= (qx + 1) * w0 and qy * h0 <= y0 and y1 <= (qy + 1) * h0
            inner = canvas[int(np.ceil(y0)) + 1:int(y1) - 1, int(np.ceil(x0)) + 1:int(x1) - 1]
            assert inner.size and np.all(np.abs(inner.astype(int) - expected_values[k]) <= 1)
            # outside the mark the tile is black: the box is tight (1 px of interpolation allowed)
            quarter = canvas[qy * h0:(qy + 1) * h0, qx * w0:(qx + 1) * w0, 0].astype(int)
            mark = np.argwhere(np.abs(quarter - expected_values[k]) <= 20) + [qy * h0, qx * w0]
            assert abs(mark[:, 1].min() - x0) <= 1.01 and abs(mark[:, 1].max() + 1 - x1) <= 1.01
            assert abs(mark[:, 0].min() - y0) <= 1.01 and abs(mark[:, 0].max() + 1 - y1) <= 1.01


def test_copy_paste_adds_the_donor_lesion_where_it_overlaps_nothing():
    from usdet.data.augment import paste_lesion

    image = _marked(200, 240, [[20, 20, 80, 90]], 60)
    annos = [{"bbox": [20, 20, 80, 90], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0, "iscrowd": 0},
             {"bbox": [150, 120, 230, 190], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0, "iscrowd": 1}]
    donor_box = [30.0, 40.0, 90.0, 100.0]
    donor = _marked(150, 150, [donor_box], 200)
    donor_anno = {"bbox": donor_box, "bbox_mode": BoxMode.XYXY_ABS, "category_id": 1, "iscrowd": 0,
                  "segmentation": {"size": [150, 150], "counts": "x"}}
    pasted = 0
    for seed in range(30):
        np.random.seed(seed)
        out, new = paste_lesion(image, annos, donor, donor_anno, scale=(0.7, 1.3))
        assert new[:2] == annos and image[0, 0, 0] == 0  # inputs untouched, old annotations kept
        if len(new) == 2:
            assert np.array_equal(out, image)
            continue
        pasted += 1
        b = new[2]
        assert b["category_id"] == 1 and b["iscrowd"] == 0 and "segmentation" not in b
        x0, y0, x1, y1 = b["bbox"]
        assert 0 <= x0 < x1 <= 240 and 0 <= y0 < y1 <= 200
        for a in annos:  # no overlap with the lesion nor the ignore region
            ax0, ay0, ax1, ay1 = a["bbox"]
            assert x1 <= ax0 or ax1 <= x0 or y1 <= ay0 or ay1 <= y0
        # the pasted lesion is whole inside its box and bright; the box is tight on it
        inner = out[int(np.ceil(y0)) + 1:int(y1) - 1, int(np.ceil(x0)) + 1:int(x1) - 1, 0]
        assert inner.min() >= 190
        bright = np.argwhere(out[..., 0] >= 100)
        assert abs(bright[:, 1].min() - x0) <= 2 and abs(bright[:, 1].max() + 1 - x1) <= 2
        assert abs(bright[:, 0].min() - y0) <= 2 and abs(bright[:, 0].max() + 1 - y1) <= 2
        assert abs((x1 - x0) / (y1 - y0) - 1.0) < 0.05  # donor's aspect kept
    assert pasted >= 20


def test_mapper_mosaic_and_copy_paste_through_the_trainer_mapper(phantom_dataset):
    from usdet.data.mapper import UsdetDatasetMapper

    dicts = _phantom_dicts(phantom_dataset)
    base = ["INPUT.AUG.HFLIP", "False", "MODEL.ROI_HEADS.NUM_CLASSES", "2"]
    mosaic = UsdetDatasetMapper(_cfg(*base, "INPUT.AUG.MOSAIC.ENABLED", "True", "INPUT.AUG.MOSAIC.PROB", "1.0",
                                     "INPUT.AUG.MOSAIC.CANVAS_SCALE", "1.5"),
                                is_train=True)
    assert mosaic._pool == []  # no pool yet: the mapper maps single images
    mosaic.set_pool(dicts)
    n_lesions = {d["image_id"]: len(d["annotations"]) for d in dicts}
    for seed in range(5):
        np.random.seed(seed)
        out = mosaic(dicts[seed])
        c, h, w = out["image"].shape
        # canvas of two 128 px images resized to 1.5x the train size (96..128 -> 144..192)
        assert min(h, w) in (144, 168, 192) or max(h, w) == 240
        boxes = out["instances"].gt_boxes.tensor.numpy()
        assert len(boxes) >= n_lesions[dicts[seed]["image_id"]]
        assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        np.random.seed(seed)
        assert np.array_equal(mosaic(dicts[seed])["image"].numpy(), out["image"].numpy())  # seeded
    paste = UsdetDatasetMapper(_cfg(*base, "INPUT.AUG.COPY_PASTE.ENABLED", "True", "INPUT.AUG.COPY_PASTE.PROB",
                                    "1.0", "INPUT.MIN_SIZE_TRAIN", "(128,)"), is_train=True)
    paste.set_pool(dicts)
    gained = 0
    for seed, d in enumerate(dicts):
        np.random.seed(seed)
        gained += len(paste(d)["instances"]) - len(d["annotations"])
    assert gained >= len(dicts) // 2  # most images get one more lesion
    with pytest.raises(ValueError, match="MASK_ON"):
        UsdetDatasetMapper(_cfg(*base, "INPUT.AUG.MOSAIC.ENABLED", "True", "MODEL.MASK_ON", "True"), is_train=True)
