"""BUSI -> COCO: per-mask boxes, negatives, duplicates, groups, crop offsets, bad inputs, determinism.

Synthetic BUSI-layout folders (phantom frames with 1-bit masks) cover the mechanics and run
everywhere; a real BUSI subset (symlinked) checks counts and boxes against the real masks.
"""
import hashlib
import json
import os

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from usdet.data import convert_image
from usdet.data.coco import mask_to_box
from usdet.data.phantom import render_phantom
from train_helpers import load_tool

SPLIT_NAMES = ("train", "val", "test")


# ---------------------------------------------------------------------------------------------- helpers
def _load_all(out):
    images, anns = {}, {}
    for split in SPLIT_NAMES:
        doc = json.load(open(os.path.join(out, "annotations", f"{split}.json")))
        for im in doc["images"]:
            images[im["source_file"]] = dict(im, split=split)
        for a in doc["annotations"]:
            anns.setdefault(a["image_id"], []).append(a)
    return images, anns


def _mask_from_file(path):
    """Independent reference: Pillow, converted to L, > 127 (SOURCE.md's rule)."""
    return np.asarray(Image.open(path).convert("L")) > 127


def _write_case(folder, name, rgb, masks):
    Image.fromarray(rgb).save(os.path.join(folder, f"{name}.png"))
    for k, m in enumerate(masks):
        suffix = "_mask" if k == 0 else f"_mask_{k}"
        Image.fromarray(m).convert("1").save(os.path.join(folder, f"{name}{suffix}.png"))


def make_fake_busi(root, n_lesion=4, n_normal=2, size=(72, 96), pad=None, seed=0):
    """BUSI layout from phantoms; ``pad`` = (left, top, right, bottom) black border around every frame."""
    truth = {}
    for label in ("benign", "malignant", "normal"):
        os.makedirs(os.path.join(root, label), exist_ok=True)
        for i in range(1, (n_normal if label == "normal" else n_lesion) + 1):
            rng = np.random.default_rng([seed, ("benign", "malignant", "normal").index(label), i])
            kinds = [] if label == "normal" else [label] * (2 if i == 1 else 1)
            rgb, boxes, _, masks = render_phantom(rng, size, kinds, return_masks=True)
            masks = [m.astype(np.uint8) * 255 for m in masks] or [np.zeros(size, np.uint8)]
            if pad:
                l, t, r, b = pad
                rgb = cv2.copyMakeBorder(rgb, t, b, l, r, cv2.BORDER_CONSTANT, value=(0, 0, 0))
                masks = [cv2.copyMakeBorder(m, t, b, l, r, cv2.BORDER_CONSTANT, value=0) for m in masks]
            _write_case(os.path.join(root, label), f"{label} ({i})", rgb, masks)
            truth[f"{label}/{label} ({i}).png"] = boxes
    return truth


def _run(root, out, *extra):
    return load_tool("convert_to_coco").main(["busi", "--root", str(root), "--output", str(out), "--no-progress",
                                              *extra])


def _tree_state(root):
    state = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            state[p] = (os.path.getsize(p), os.path.getmtime(p), hashlib.md5(open(p, "rb").read()).hexdigest())
    return state


# ---------------------------------------------------------------------------------------------- synthetic
def test_masks_become_one_annotation_each_and_normals_are_negatives(tmp_path):
    truth = make_fake_busi(tmp_path / "root")
    assert _run(tmp_path / "root", tmp_path / "out", "--classes", "benign,malignant") == 0
    images, anns = _load_all(tmp_path / "out")
    assert set(images) == set(truth)
    for src, boxes in truth.items():
        im = images[src]
        got = sorted(a["bbox"] for a in anns.get(im["id"], []))
        assert got == sorted(boxes), src
        assert im["crop_box"] == [0, 0, 96, 72] and (im["width"], im["height"]) == (96, 72)
        expected_cat = {"benign": 1, "malignant": 2, "normal": None}[im["label"]]
        assert all(a["category_id"] == expected_cat for a in anns.get(im["id"], []))
        for a in anns.get(im["id"], []):
            m = mask_util.decode(dict(a["segmentation"], counts=a["segmentation"]["counts"].encode()))
            assert mask_to_box(m) == a["bbox"] and a["area"] == m.sum() and a["iscrowd"] == 0
    assert len(anns[images["benign/benign (1).png"]["id"]]) == 2  # the _mask_1 file is its own box
    report = json.load(open(tmp_path / "out/report.json"))
    assert report["counts"]["total"]["images"] == 10 and report["counts"]["total"]["annotations"] == 10
    assert report["counts"]["total"]["images_by_label"] == {"benign": 4, "malignant": 4, "normal": 2}
    stats = json.load(open(tmp_path / "out/pixel_stats.json"))
    assert stats["num_images"] == report["counts"]["train"]["images"] and stats["split"] == "train"
    ids = sorted(im["id"] for im in images.values())
    assert ids == list(range(1, 11))


def test_crop_offsets_shift_boxes_exactly(tmp_path, monkeypatch):
    """Frames padded inside a black border: cropping them back gives the unpadded boxes and pixels."""
    pad = (13, 7, 21, 5)
    truth = make_fake_busi(tmp_path / "plain", n_lesion=2, n_normal=1)
    make_fake_busi(tmp_path / "padded", n_lesion=2, n_normal=1, pad=pad)

    class Found:
        def __init__(self, box):
            self.box, self.confidence, self.reason = box, 1.0, "test cropper"

    def non_black_region(rgb):
        x, y, w, h = cv2.boundingRect((rgb.max(axis=2) > 0).astype(np.uint8))
        return Found((x, y, x + w, y + h))

    monkeypatch.setattr(convert_image, "find_image_region", non_black_region)
    assert _run(tmp_path / "plain", tmp_path / "out_plain") == 0
    assert _run(tmp_path / "padded", tmp_path / "out_padded", "--crop", "auto") == 0
    plain, plain_anns = _load_all(tmp_path / "out_plain")
    padded, padded_anns = _load_all(tmp_path / "out_padded")
    for src in truth:
        a, b = plain[src], padded[src]
        assert b["crop_box"] == [pad[0], pad[1], pad[0] + 96, pad[1] + 72]
        assert (b["width"], b["height"]) == (96, 72)
        assert [x["bbox"] for x in plain_anns.get(a["id"], [])] == [x["bbox"] for x in padded_anns.get(b["id"], [])]
        img_a = cv2.imread(str(tmp_path / "out_plain" / a["file_name"]), cv2.IMREAD_UNCHANGED)
        img_b = cv2.imread(str(tmp_path / "out_padded" / b["file_name"]), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(img_a, img_b)
        # and against the source masks: box in the written image + crop origin = box in the source
        src_masks = sorted(p for p in os.listdir(tmp_path / "padded" / os.path.dirname(src))
                           if p.startswith(os.path.basename(src)[:-4] + "_mask"))
        src_boxes = [mask_to_box(_mask_from_file(tmp_path / "padded" / os.path.dirname(src) / m)) for m in src_masks]
        shifted = [[x["bbox"][0] + pad[0], x["bbox"][1] + pad[1]] + x["bbox"][2:] for x in padded_anns.get(b["id"], [])]
        assert sorted(shifted) == sorted(bx for bx in src_boxes if bx)
    report = json.load(open(tmp_path / "out_padded/report.json"))
    assert report["crop"]["outcomes"] == {"cropped": 5}


def test_max_size_resizes_masks_with_images(tmp_path):
    make_fake_busi(tmp_path / "root", n_lesion=2, n_normal=1)
    assert _run(tmp_path / "root", tmp_path / "full") == 0
    assert _run(tmp_path / "root", tmp_path / "small", "--max-size", "48", "--image-format", "jpg") == 0
    full, full_anns = _load_all(tmp_path / "full")
    small, small_anns = _load_all(tmp_path / "small")
    for src, im in small.items():
        assert (im["width"], im["height"]) == (48, 36) and im["scale"] == 0.5
        assert (im["split"], im["group"], im["id"]) == (full[src]["split"], full[src]["group"], full[src]["id"])
        assert im["file_name"].endswith(".jpg") and cv2.imread(str(tmp_path / "small" / im["file_name"])).shape[:2] == (36, 48)
        for a, b in zip(full_anns.get(full[src]["id"], []), small_anns.get(im["id"], [])):
            assert np.allclose(np.array(b["bbox"]), np.array(a["bbox"]) * 0.5, atol=1.5)


def test_bad_inputs_get_per_file_reasons(tmp_path):
    root = tmp_path / "root"
    make_fake_busi(root, n_lesion=6, n_normal=2)
    b = root / "benign"
    (b / "benign (1).png").write_bytes(b"")  # zero-byte
    data = (b / "benign (2).png").read_bytes()
    (b / "benign (2).png").write_bytes(data[: len(data) // 2])  # truncated
    (b / "benign (3).png").write_text("this is not a png")  # non-image with a .png name
    Image.open(b / "benign (4)_mask.png").resize((50, 40)).save(b / "benign (4)_mask.png")  # wrong-size mask
    os.remove(b / "benign (5)_mask.png")  # mask missing
    (b / "README.txt").write_text("notes")  # non-image file
    Image.new("1", (96, 72)).save(b / "benign (99)_mask.png")  # mask without image
    os.remove(root / "normal" / "normal (2)_mask.png")  # a normal needs no mask: kept, with a note
    m = root / "malignant"
    rgb = np.asarray(Image.open(m / "malignant (1).png").convert("RGB"))
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])).save(m / "malignant (1).png")  # RGBA
    Image.fromarray(rgb).convert("P").save(m / "malignant (2).png")  # palette
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(m / "malignant (3).png")  # 16-bit
    before = _tree_state(root)

    assert _run(root, tmp_path / "out") == 0
    assert _tree_state(root) == before  # ROOT never modified
    report = json.load(open(tmp_path / "out/report.json"))
    reasons = {s["file"]: s["reason"] for s in report["skipped"]}
    assert "zero-byte" in reasons["benign/benign (1).png"]
    assert "truncated" in reasons["benign/benign (2).png"]
    assert "not an image" in reasons["benign/benign (3).png"]
    assert "mask is 50x40 but its image benign/benign (4).png is 96x72" in reasons["benign/benign (4)_mask.png"]
    assert "mask missing" in reasons["benign/benign (5).png"]
    assert "not an image file" in reasons["benign/README.txt"]
    assert "mask without an image" in reasons["benign/benign (99)_mask.png"]
    assert len(reasons) == 7
    images, anns = _load_all(tmp_path / "out")
    assert set(images) == {"benign/benign (6).png", "malignant/malignant (1).png", "malignant/malignant (2).png",
                           "malignant/malignant (3).png", "malignant/malignant (4).png",
                           "malignant/malignant (5).png", "malignant/malignant (6).png",
                           "normal/normal (1).png", "normal/normal (2).png"}
    notes = {(n["file"], n["note"]) for n in report["notes"]}
    assert ("malignant/malignant (1).png", "RGBA image: opaque alpha dropped") in notes
    assert ("malignant/malignant (3).png", "16-bit image rescaled to 8 bits (min-max)") in notes
    assert ("normal/normal (2).png", "normal image without a mask file: kept as a negative") in notes
    for name in ("malignant (1)", "malignant (2)"):  # RGBA and palette keep their (decoded) pixels
        out = cv2.imread(str(tmp_path / "out" / images[f"malignant/{name}.png"]["file_name"]))
        ref = np.asarray(Image.open(root / "malignant" / f"{name}.png").convert("RGB"))
        assert np.array_equal(cv2.cvtColor(out, cv2.COLOR_BGR2RGB), ref)
    assert all(anns.get(images[f"malignant/malignant ({i}).png"]["id"]) for i in (1, 2, 3))


def test_wrong_root_fails_with_expected_layout(tmp_path, capsys):
    (tmp_path / "Dataset_BUSI_with_GT" / "benign").mkdir(parents=True)
    assert _run(tmp_path, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "no benign/, malignant/ or normal/ folder" in err and "ROOT/benign/benign (1)_mask.png" in err
    assert "did you mean --root" in err and "Dataset_BUSI_with_GT" in err
    assert not (tmp_path / "out").exists()
    assert _run(tmp_path / "missing", tmp_path / "out") == 2
    assert _run(tmp_path / "Dataset_BUSI_with_GT", tmp_path / "Dataset_BUSI_with_GT" / "out") == 2  # OUT in ROOT


def test_rerun_is_byte_identical_and_workers_agree(tmp_path):
    make_fake_busi(tmp_path / "root", n_lesion=3, n_normal=2)
    assert _run(tmp_path / "root", tmp_path / "a") == 0
    first = _tree_state(tmp_path / "a")
    (tmp_path / "a/images/benign/.benign_1.png.123.tmp").write_bytes(b"partial")  # a killed run's leftovers
    (tmp_path / "a/images/benign/benign_77.png").write_bytes(b"stale")
    assert _run(tmp_path / "root", tmp_path / "a") == 0
    again = _tree_state(tmp_path / "a")
    assert {p: v[2] for p, v in first.items()} == {p: v[2] for p, v in again.items()}
    assert _run(tmp_path / "root", tmp_path / "b", "--workers", "2") == 0
    for rel in ("annotations/train.json", "annotations/val.json", "annotations/test.json", "report.json",
                "pixel_stats.json"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert not [p for p in again if p.endswith(".tmp")]


def test_near_duplicates_share_a_group_and_split(tmp_path):
    root = tmp_path / "root"
    make_fake_busi(root, n_lesion=6, n_normal=2)
    # a re-saved, slightly brighter copy of benign (2) and an exact copy of benign (3) filed as malignant
    src = np.asarray(Image.open(root / "benign/benign (2).png").convert("RGB")).astype(int)
    _write_case(str(root / "benign"), "benign (7)", np.clip(src + 3, 0, 255).astype(np.uint8),
                [np.asarray(Image.open(root / "benign/benign (2)_mask.png").convert("L"))])
    for suffix in (".png", "_mask.png"):
        (root / f"malignant/malignant (7){suffix}").write_bytes((root / f"benign/benign (3){suffix}").read_bytes())
    assert _run(root, tmp_path / "out", "--seed", "3") == 0
    images, _ = _load_all(tmp_path / "out")
    a, b = images["benign/benign (2).png"], images["benign/benign (7).png"]
    assert a["group"] == b["group"] and a["split"] == b["split"]
    report = json.load(open(tmp_path / "out/report.json"))
    assert "benign/benign (3).png" not in images and "malignant/malignant (7).png" not in images
    assert report["exact_duplicates"] == [{"files": ["benign/benign (3).png", "malignant/malignant (7).png"],
                                           "labels": ["benign", "malignant"],
                                           "action": "excluded (conflicting labels)"}]
    group = [g for g in report["near_duplicate_groups"] if "benign/benign (2).png" in g["files"]]
    assert group[0]["files"] == ["benign/benign (2).png", "benign/benign (7).png"]  # and nothing else
    assert group[0]["label_conflict"] is False
    assert not os.path.exists(tmp_path / "out/images/benign/benign_3.png")


# ---------------------------------------------------------------------------------------------- real BUSI
SUBSET = {
    "benign": [1, 2, 3, 4, 5, 6, 25, 42, 85, 131, 195, 399, 433, 437],
    "malignant": [1, 2, 3, 4, 5, 51, 52, 53, 93, 145],
    "normal": [1, 2, 3, 4, 34, 113],
}


@pytest.fixture(scope="module")
def busi_subset(busi_root, tmp_path_factory):
    """Symlinked ~40-image BUSI subset: multi-mask, exact and near duplicates, normals; converted once."""
    root = tmp_path_factory.mktemp("busi_subset")
    for label, numbers in SUBSET.items():
        os.makedirs(root / label)
        for n in numbers:
            stem = f"{label} ({n})"
            for f in os.listdir(os.path.join(busi_root, label)):
                if f == f"{stem}.png" or f.startswith(f"{stem}_mask"):
                    os.symlink(os.path.join(busi_root, label, f), root / label / f)
    out = root.parent / (root.name + "_out")
    assert _run(root, out, "--classes", "benign,malignant", "--workers", "2") == 0
    return root, out


def test_real_busi_subset_counts_and_boxes(busi_subset):
    root, out = busi_subset
    images, anns = _load_all(out)
    report = json.load(open(out / "report.json"))
    n_total = sum(len(v) for v in SUBSET.values())
    assert len(images) == n_total - 2  # benign 433 == malignant 145, conflicting labels: both out
    assert {s["file"] for s in report["skipped"]} == {"benign/benign (433).png", "malignant/malignant (145).png"}
    expected_masks = 0
    for src, im in images.items():
        folder, stem = os.path.dirname(src), os.path.basename(src)[:-4]
        mask_files = sorted(f for f in os.listdir(root / folder) if f.startswith(stem + "_mask"))
        ref = [mask_to_box(_mask_from_file(root / folder / f)) for f in mask_files]
        ref = sorted(b for b in ref if b is not None)
        got = sorted(a["bbox"] for a in anns.get(im["id"], []))
        assert got == ref, src
        expected_masks += len(ref)
        w, h = Image.open(root / src).size
        assert im["crop_box"] == [0, 0, w, h] and (im["width"], im["height"]) == (w, h)
        if im["label"] == "normal":
            assert not anns.get(im["id"])
    assert len(anns[images["benign/benign (4).png"]["id"]]) == 2
    assert len(anns[images["benign/benign (195).png"]["id"]]) == 3
    assert report["counts"]["total"]["annotations"] == expected_masks
    assert report["counts"]["total"]["images_by_label"] == {"benign": 13, "malignant": 9, "normal": 6}
    # written pixels equal the source pixels (crop none)
    for src in ("benign/benign (4).png", "normal/normal (113).png"):
        written = cv2.cvtColor(cv2.imread(str(out / images[src]["file_name"])), cv2.COLOR_BGR2RGB)
        assert np.array_equal(written, np.asarray(Image.open(root / src).convert("RGB")))
    # SOURCE.md's eye-checked near-duplicates stay together
    for pair in (("benign (399)", "malignant (93)"), ("benign (131)", "malignant (51)"),
                 ("benign (85)", "malignant (52)"), ("benign (437)", "normal (34)")):
        a, b = (images[f"{p.split(' ')[0]}/{p}.png"] for p in pair)
        assert a["group"] == b["group"] and a["split"] == b["split"], pair


def test_crop_auto_runs_the_real_cropper_on_drawn_screens(tmp_path):
    """--crop auto through usdet.data.crop itself (no stand-in): scanner screens drawn around phantoms."""
    from usdet.data.crop import find_image_region
    from usdet.data.screens import make_screen

    rng = np.random.default_rng(21)
    root, truth = tmp_path / "root", {}
    os.makedirs(root / "benign")
    for i in range(1, 5):
        gray = render_phantom(np.random.default_rng(100 + i), (220, 300), ["benign"])[0][..., 0]
        s = make_screen(rng, gray, [(120, 90, 170, 130)], probe="linear", theme=("dark", "grey")[i % 2],
                        jpeg_quality=None, gain=1.0, doppler=False)
        mask = np.zeros(s.frame.shape[:2], np.uint8)
        x0, y0, x1, y1 = s.lesion_boxes[0]
        mask[y0:y1, x0:x1] = 255
        Image.fromarray(s.frame).save(root / "benign" / f"benign ({i}).png")
        Image.fromarray(mask).save(root / "benign" / f"benign ({i})_mask.png")
        truth[f"benign/benign ({i}).png"] = (s, find_image_region(s.frame).box)
    assert _run(root, tmp_path / "out", "--crop", "auto") == 0
    images, anns = _load_all(tmp_path / "out")
    report = json.load(open(tmp_path / "out/report.json"))
    assert report["crop"]["outcomes"] == {"cropped": 4}
    for src, (s, found) in truth.items():
        im = images[src]
        assert im["crop_box"] == list(found)  # the real cropper's own answer
        bx0, by0 = max(found[0], s.box[0]), max(found[1], s.box[1])
        bx1, by1 = min(found[2], s.box[2]), min(found[3], s.box[3])
        inter = max(0, bx1 - bx0) * max(0, by1 - by0)
        area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
        assert inter / (area(found) + area(s.box) - inter) >= 0.95, (found, s.box)
        x0, y0, x1, y1 = s.lesion_boxes[0]
        (box,) = [a["bbox"] for a in anns[im["id"]]]
        assert [box[0] + found[0], box[1] + found[1], box[2], box[3]] == [x0, y0, x1 - x0, y1 - y0]
        assert (im["width"], im["height"]) == (found[2] - found[0], found[3] - found[1])
