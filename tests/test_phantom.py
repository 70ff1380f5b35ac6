"""Phantom path end to end: generate -> register -> DatasetCatalog records with the drawn boxes."""
import json
import os

import cv2
import numpy as np

from usdet.data.coco import mask_to_box
from usdet.data.phantom import make_phantom_dataset, render_phantom


def test_render_phantom_boxes_match_masks_and_lesions_are_dark():
    rng = np.random.default_rng(4)
    rgb, boxes, labels, masks = render_phantom(rng, (96, 128), ["benign", "malignant"], return_masks=True)
    assert rgb.shape == (96, 128, 3) and rgb.dtype == np.uint8
    assert labels == ["benign", "malignant"]
    assert not (masks[0] & masks[1]).any()
    for box, m in zip(boxes, masks):
        assert box == mask_to_box(m)
        gray = rgb[..., 0].astype(float)
        assert gray[m].mean() < 0.5 * gray[~np.logical_or(*masks)].mean()  # hypo-echoic
    rgb0, boxes0, labels0 = render_phantom(np.random.default_rng(1), 64, [])
    assert boxes0 == [] and labels0 == []


def test_phantom_dataset_layout_and_catalog(phantom_dataset):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from usdet.data.register import register_all_usdet_datasets

    root = os.path.dirname(phantom_dataset)
    names = register_all_usdet_datasets(root)
    ds = os.path.basename(phantom_dataset)
    assert {f"{ds}_train", f"{ds}_val", f"{ds}_test"} <= set(names)
    stats = json.load(open(os.path.join(phantom_dataset, "pixel_stats.json")))
    assert stats["split"] == "train" and len(stats["mean"]) == 3 and 20 < stats["mean"][0] < 200
    total, negatives = 0, 0
    for split in ("train", "val", "test"):
        doc = json.load(open(os.path.join(phantom_dataset, "annotations", f"{split}.json")))
        recs = DatasetCatalog.get(f"{ds}_{split}")
        assert MetadataCatalog.get(f"{ds}_{split}").thing_classes == ["benign", "malignant"]
        assert len(recs) == len(doc["images"])
        total += len(recs)
        for rec in recs:
            img = cv2.imread(rec["file_name"], cv2.IMREAD_GRAYSCALE)
            assert img.shape == (rec["height"], rec["width"])
            negatives += not rec["annotations"]
            for a in rec["annotations"]:
                x, y, w, h = (int(v) for v in a["bbox"])
                inside = img[y:y + h, x:x + w].astype(float).mean()
                assert inside < img.astype(float).mean()  # the box sits on a dark lesion
                assert a["category_id"] in (0, 1)  # contiguous ids after loading
    assert total == 24 and negatives >= 4


def test_phantom_is_deterministic(tmp_path):
    a = make_phantom_dataset(str(tmp_path / "a"), num_images=6, size=64, seed=2)
    b = make_phantom_dataset(str(tmp_path / "b"), num_images=6, size=64, seed=2)
    for rel in ("annotations/train.json", "report.json", "pixel_stats.json", "images/phantom_0003.png"):
        assert open(os.path.join(a, rel), "rb").read() == open(os.path.join(b, rel), "rb").read()
    doc = json.load(open(os.path.join(a, "annotations/train.json")))
    assert doc["categories"] == [{"id": 1, "name": "lesion"}]
