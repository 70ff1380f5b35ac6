"""The converter core's sources: BrEaST (real + synthetic .xlsx), BUS-BRA (synthetic, published layout),
generic image+mask folders; ignore regions, published and k folds, zero split fractions, bad input.
"""
import csv
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from usdet.data.coco import mask_to_box
from usdet.data.phantom import render_phantom
from train_helpers import REPO, load_tool

BREAST_ROOT = os.environ.get("USDET_BREAST_ROOT", os.path.normpath(os.path.join(REPO, "..", "shared", "data",
                                                                                 "breast")))
SIZE = (60, 80)  # h, w of synthetic frames


NO_NEAR_DUPS = ("--near-dup-corr", "2", "--near-dup-hamming", "-1")  # phantoms look alike at 64x64


def run(*argv):
    return load_tool("convert_to_coco").main([*map(str, argv), "--no-progress"])


def load(out):
    """{source_file: image entry + split}, {image_id: [annotations]}, report."""
    images, anns = {}, {}
    for split in ("train", "val", "test"):
        path = os.path.join(out, "annotations", f"{split}.json")
        if not os.path.exists(path):
            continue
        doc = json.load(open(path))
        for im in doc["images"]:
            images[im["source_file"]] = dict(im, split=split)
        for a in doc["annotations"]:
            anns.setdefault(a["image_id"], []).append(a)
    return images, anns, json.load(open(os.path.join(out, "report.json")))


def phantom(seed, kinds=("benign",), size=SIZE):
    rgb, boxes, _, masks = render_phantom(np.random.default_rng(seed), size, list(kinds), return_masks=True)
    return rgb, [m.astype(np.uint8) * 255 for m in masks], boxes


def write_png(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), arr[..., ::-1] if arr.ndim == 3 else arr)


def reasons(report):
    return {s["file"]: s["reason"] for s in report["skipped"]}


# ---------------------------------------------------------------------------------------------- BrEaST
HEADER = ["CaseID", "Image_filename", "Mask_tumor_filename", "Mask_other_filename", "Pixel_size", "Age",
          "BIRADS", "Verification", "Diagnosis", "Classification"]


def make_breast(root, rows, drop_columns=()):
    """A BrEaST-layout tree: ``rows`` are dicts of the spreadsheet's columns; files are written by the caller."""
    import openpyxl

    os.makedirs(root / "BrEaST-Lesions_USG-images_and_masks", exist_ok=True)
    wb = openpyxl.Workbook()
    ws = wb.active
    header = [h for h in HEADER if h not in drop_columns]
    ws.append(header)
    for r in rows:
        ws.append([r.get(h) for h in header])
    wb.create_sheet("Data Dictionary").append(["column", "meaning"])
    wb.save(root / "BrEaST-Lesions-USG-clinical-data-Dec-15-2023.xlsx")
    return root / "BrEaST-Lesions_USG-images_and_masks"


def breast_case(folder, n, label, seed, other=0):
    """caseNNN.png (+ _tumor, + _otherK); returns the spreadsheet row and the true lesion box."""
    rgb, masks, boxes = phantom(seed, () if label == "normal" else ("benign",))
    name = f"case{n:03d}"
    write_png(folder / f"{name}.png", np.dstack([rgb, np.full(SIZE, 255, np.uint8)]))  # RGBA, as published
    row = {"CaseID": n, "Image_filename": f"{name}.png", "Pixel_size": 0.0078125, "Age": 50 + n, "BIRADS": "4a",
           "Verification": "confirmed by biopsy", "Diagnosis": "Fibroadenoma", "Classification": label}
    if label != "normal":
        write_png(folder / f"{name}_tumor.png", masks[0])
        row["Mask_tumor_filename"] = f"{name}_tumor.png"
    others = []
    for k in range(1, other + 1):
        m = np.zeros(SIZE, np.uint8)
        m[2 + 10 * k:8 + 10 * k, 3:12] = 255
        write_png(folder / f"{name}_other{k}.png", m)
        others.append(f"{name}_other{k}.png")
    if others:
        row["Mask_other_filename"] = "&".join(others)
    return row, (boxes[0] if boxes else None)


@pytest.fixture(scope="module")
def breast_synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("breast")
    folder = make_breast(root, [])
    rows, truth = [], {}
    for n, label in enumerate(["benign", "malignant", "benign", "normal", "malignant", "benign"], start=1):
        row, box = breast_case(folder, n, label, seed=n, other=2 if n == 1 else 0)
        rows.append(row)
        truth[f"case{n:03d}.png"] = box
    # bad input, one problem each
    r, _ = breast_case(folder, 7, "benign", 7)
    rows.append(dict(r, Classification="probably benign"))  # unknown label
    r, _ = breast_case(folder, 8, "benign", 8)
    rows += [r, dict(r)]  # duplicate ID
    rows.append({"CaseID": 9, "Image_filename": "case009.png", "Mask_tumor_filename": "case009_tumor.png",
                 "Classification": "benign"})  # ID without image
    breast_case(folder, 10, "benign", 10)  # image without row
    r, _ = breast_case(folder, 11, "benign", 11)
    os.remove(folder / "case011_tumor.png")
    rows.append(r)  # mask missing
    r, _ = breast_case(folder, 12, "benign", 12)
    write_png(folder / "case012_tumor.png", np.zeros(SIZE, np.uint8))
    rows.append(r)  # empty mask
    r, _ = breast_case(folder, 13, "benign", 13)
    write_png(folder / "case013_tumor.png", np.full((30, 30), 255, np.uint8))
    rows.append(r)  # mask of another size
    r, _ = breast_case(folder, 14, "benign", 14)
    grey = cv2.imread(str(folder / "case014_tumor.png"), cv2.IMREAD_GRAYSCALE)
    write_png(folder / "case014_tumor.png", cv2.GaussianBlur(grey, (5, 5), 0))
    rows.append(r)  # not binary
    r, _ = breast_case(folder, 15, "benign", 15)
    (folder / "case015.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    rows.append(r)  # unreadable
    make_breast(root, rows)
    return root, truth


def test_breast_synthetic_boxes_ignore_regions_keys_and_bad_input(breast_synthetic, tmp_path):
    root, truth = breast_synthetic
    before = {p: os.path.getmtime(p) for p in root.rglob("*")}
    assert run("breast", "--root", root, "--output", tmp_path / "out", "--classes", "benign,malignant") == 0
    assert {p: os.path.getmtime(p) for p in root.rglob("*")} == before  # ROOT never modified
    images, anns, report = load(tmp_path / "out")
    folder = "BrEaST-Lesions_USG-images_and_masks/"
    assert set(images) == {folder + f for f in truth}
    for f, box in truth.items():
        im = images[folder + f]
        lesions = [a for a in anns.get(im["id"], []) if not a["iscrowd"]]
        assert [a["bbox"] for a in lesions] == ([] if box is None else [box])
        assert im["patient"] == im["group"] == f[:-4]
        assert im["birads"] == "4a" and im["pixel_size_cm"] == 0.0078125
        assert im["histology"] == "Fibroadenoma" and im["verification"] == "confirmed by biopsy"
        assert "age" not in im and "Age" not in im
    case1 = images[folder + "case001.png"]
    ignore = sorted((a for a in anns[case1["id"]] if a["iscrowd"]), key=lambda a: a["bbox"][1])
    assert [a["bbox"] for a in ignore] == [[3.0, 12.0, 9.0, 6.0], [3.0, 22.0, 9.0, 6.0]]
    assert all(a["area"] == 54.0 and a["category_id"] == 1 for a in ignore)  # category of the image's label
    assert report["counts"]["total"]["ignore_regions"] == 2 and report["counts"]["total"]["images_with_ignore_regions"] == 1
    assert report["counts"]["total"]["images_by_label"] == {"benign": 3, "malignant": 2, "normal": 1}
    why = reasons(report)
    sheet = "BrEaST-Lesions-USG-clinical-data-Dec-15-2023.xlsx"
    assert "unknown label 'probably benign'" in why[f"{sheet} row 8"]
    assert "duplicate ID" in why[f"{sheet} row 9"] and "duplicate ID" in why[f"{sheet} row 10"]
    assert "listed in" in why[folder + "case009.png"] and "not found" in why[folder + "case009.png"]
    assert "without a row" in why[folder + "case010.png"]
    assert "mask missing" in why[folder + "case011_tumor.png"]
    assert "masks are all empty" in why[folder + "case012.png"]
    assert "mask is 30x30 but its image" in why[folder + "case013_tumor.png"]
    assert "not binary" in why[folder + "case014_tumor.png"]
    assert "unreadable" in why[folder + "case015.png"]
    assert not [p for p in (tmp_path / "out").rglob("*.tmp")]


def test_breast_other_masks_choices_and_missing_columns(breast_synthetic, tmp_path):
    root, _ = breast_synthetic
    assert run("breast", "--root", root, "--output", tmp_path / "lesion", "--other-masks", "lesion") == 0
    assert run("breast", "--root", root, "--output", tmp_path / "skip", "--other-masks", "skip") == 0
    _, _, as_lesion = load(tmp_path / "lesion")
    _, _, skipped = load(tmp_path / "skip")
    assert as_lesion["counts"]["total"]["annotations"] == 5 + 2 and as_lesion["counts"]["total"]["ignore_regions"] == 0
    assert skipped["counts"]["total"]["annotations"] == 5 and skipped["counts"]["total"]["ignore_regions"] == 0
    assert "--other-masks skip" in reasons(skipped)["BrEaST-Lesions_USG-images_and_masks/case001_other1.png"]
    # a spreadsheet without Classification cannot be used; without BIRADS it is converted with a note
    import shutil

    for drop, code in (("Classification", 2), ("BIRADS", 0)):
        copy = tmp_path / f"no_{drop}"
        shutil.copytree(root, copy)
        _, rows = __import__("usdet.data.tables", fromlist=["read_table"]).read_table(
            str(next(root.glob("*.xlsx"))), ["CaseID"])
        make_breast(copy, [{k: (int(v) if k == "CaseID" else v) for k, v in r.items()} for _, r in rows],
                    drop_columns=(drop,))
        assert run("breast", "--root", copy, "--output", tmp_path / f"out_{drop}") == code
    _, _, report = load(tmp_path / "out_BIRADS")
    assert any("'BIRADS'" in n["note"] for n in report["notes"])
    assert not (tmp_path / "out_Classification").exists()


@pytest.mark.skipif(not os.path.isdir(BREAST_ROOT), reason=f"BrEaST-Lesions-USG not found at {BREAST_ROOT}: set "
                                                           "USDET_BREAST_ROOT to run the real-data test")
def test_breast_real_counts(tmp_path):
    assert run("breast", "--root", BREAST_ROOT, "--output", tmp_path / "out", "--workers", "2") == 0
    images, anns, report = load(tmp_path / "out")
    total = report["counts"]["total"]
    assert (total["images"], total["annotations"], total["ignore_regions"]) == (256, 252, 14)
    assert total["images_with_ignore_regions"] == 7 and total["images_by_label"]["normal"] == 4
    assert report["skipped"] == []
    with_ignore = sorted(int(im["patient"][4:]) for im in images.values()
                         if any(a["iscrowd"] for a in anns.get(im["id"], [])))
    assert with_ignore == [22, 36, 38, 85, 92, 140, 151]  # SOURCE.md's seven cases
    # boxes equal the published masks' bounding boxes
    folder = os.path.join(BREAST_ROOT, "BrEaST-Lesions_USG-images_and_masks")
    for n in (1, 22, 140):
        im = images[f"BrEaST-Lesions_USG-images_and_masks/case{n:03d}.png"]
        ref = mask_to_box(cv2.imread(os.path.join(folder, f"case{n:03d}_tumor.png"), cv2.IMREAD_GRAYSCALE) > 127)
        assert [a["bbox"] for a in anns[im["id"]] if not a["iscrowd"]] == [ref]
    assert {im["verification"] for im in images.values()} >= {"confirmed by biopsy", "confirmed by follow-up care"}


# ---------------------------------------------------------------------------------------------- BUS-BRA
def make_busbra(root, n_cases=12):
    """The published BUS-BRA layout; cases with an odd number have two views (l, r). Returns {ID: (case, box)}."""
    truth, rows, fold_rows = {}, [], []
    for case in range(1, n_cases + 1):
        for side in (("l", "r") if case % 2 else ("s",)):
            image_id = f"bus_{case:04d}-{side}"
            label = "malignant" if case % 3 == 0 else "benign"
            rgb, masks, boxes = phantom(1000 + case * 3 + len(side) + ord(side), (label,))
            write_png(root / "Images" / f"{image_id}.png", rgb[..., 0])
            write_png(root / "Masks" / f"mask_{case:04d}-{side}.png", masks[0])
            x, y, w, h = (int(v) for v in boxes[0])
            rows.append([image_id, case, "fibroadenoma" if label == "benign" else "IDC", label, 4 if label == "benign"
                         else 5, ["GE", "Toshiba", "Philips", "Siemens"][case % 4], SIZE[1], SIZE[0], side,
                         f"[{x},{y},{w},{h}]"])
            fold_rows.append([image_id, label])
            truth[image_id] = (str(case), boxes[0])
    os.makedirs(root, exist_ok=True)
    with open(root / "bus_data.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ID", "Case", "Histology", "Pathology", "BIRADS", "Device", "Width", "Height", "Side", "BBOX"])
        w.writerows(rows)
    for k in (5, 10):
        with open(root / f"{k}-fold-cv.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["ID", "Pathology", "kFold"] + [f"valid_{i}" for i in range(1, k + 1)])
            w.writerows([r + [int(r[0][4:8]) % k + 1] + [0] * k for r in fold_rows])  # kFold = case % k + 1
    return truth


def test_busbra_layout_groups_keys_and_size_note(tmp_path):
    truth = make_busbra(tmp_path / "root")
    data = (tmp_path / "root" / "bus_data.csv").read_text().splitlines()
    data[1] = data[1].replace(f",{SIZE[1]},{SIZE[0]},", ",999,888,")  # CSV size disagrees with the image
    (tmp_path / "root" / "bus_data.csv").write_text("\n".join(data) + "\n")
    assert run("busbra", "--root", tmp_path / "root", "--output", tmp_path / "out", "--seed", "1",
               *NO_NEAR_DUPS) == 0
    images, anns, report = load(tmp_path / "out")
    assert len(images) == len(truth) and report["skipped"] == []
    for image_id, (case, box) in truth.items():
        im = images[f"Images/{image_id}.png"]
        assert [a["bbox"] for a in anns[im["id"]]] == [box]
        assert im["patient"] == im["group"] == case
        assert im["device"] == ["GE", "Toshiba", "Philips", "Siemens"][int(case) % 4]
        assert im["birads"] in ("4", "5") and im["histology"] in ("fibroadenoma", "IDC")
    for case in range(1, 13, 2):  # two views of one patient never straddle splits
        assert images[f"Images/bus_{case:04d}-l.png"]["split"] == images[f"Images/bus_{case:04d}-r.png"]["split"]
    assert len({im["split"] for im in images.values()}) == 3
    first = "Images/bus_0001-l.png"
    assert {"file": first, "note": "bus_data.csv row 2 (Width, Height) says 999x888, the image is 80x60 "
                                   "(the image is used)"} in report["notes"]


def test_busbra_published_folds(tmp_path):
    truth = make_busbra(tmp_path / "root")
    assert run("busbra", "--root", tmp_path / "root", "--output", tmp_path / "out", "--folds-file", "5-fold-cv.csv",
               "--test-fold", "2") == 0
    images, _, report = load(tmp_path / "out")
    test = {s for s, im in images.items() if im["split"] == "test"}
    assert test == {f"Images/{i}.png" for i in truth if int(i[4:8]) % 5 + 1 == 2}
    assert report["split"]["method"] == "published folds" and report["split"]["test_fold"] == 2
    from collections import Counter

    assert report["fold_sizes"] == {str(k): n for k, n in sorted(Counter(int(i[4:8]) % 5 + 1 for i in truth).items())}
    assert run("busbra", "--root", tmp_path / "root", "--output", tmp_path / "x", "--folds-file", "5-fold-cv.csv") == 2


def test_busbra_bad_input(tmp_path):
    root = tmp_path / "root"
    make_busbra(root)
    lines = (root / "bus_data.csv").read_text().splitlines()
    lines[3] = lines[3].replace("benign", "borderline")  # unknown label (row 4)
    lines.append(lines[5])  # duplicate ID (rows 6 and 20)
    lines.append(lines[1].replace("bus_0001-l", "bus_0099-l"))  # ID without image (row 21)
    (root / "bus_data.csv").write_text("\n".join(lines) + "\n")
    write_png(root / "Images" / "bus_0050-s.png", np.full(SIZE, 80, np.uint8))  # image without row
    os.remove(root / "Masks" / "mask_0004-s.png")  # mask missing
    write_png(root / "Masks" / "mask_0006-s.png", np.zeros(SIZE, np.uint8))  # empty mask
    write_png(root / "Masks" / "mask_0008-s.png", np.full((20, 20), 255, np.uint8))  # other size
    m = cv2.imread(str(root / "Masks" / "mask_0010-s.png"), cv2.IMREAD_GRAYSCALE)
    write_png(root / "Masks" / "mask_0010-s.png", (m // 255) * 128 + (m > 0) * np.uint8(1))  # 0/129/... grey
    m2 = np.zeros(SIZE, np.uint8)
    m2[5:20, 5:20], m2[30:40, 30:40] = 255, 100
    write_png(root / "Masks" / "mask_0012-s.png", m2)  # three grey values: not binary
    (root / "Images" / "bus_0011-l.png").write_bytes(b"")  # unreadable (zero bytes)
    assert run("busbra", "--root", root, "--output", tmp_path / "out") == 0
    images, _, report = load(tmp_path / "out")
    why = reasons(report)
    assert "unknown label 'borderline'" in why["bus_data.csv row 4"]
    assert sorted(f for f, r in why.items() if "duplicate ID" in r) == ["bus_data.csv row 20", "bus_data.csv row 6"]
    assert "no image" in why["bus_data.csv row 21"]
    assert "without a row" in why["Images/bus_0050-s.png"]
    assert "mask missing" in why["Masks/mask_0004-s.png"]
    assert "all empty" in why["Images/bus_0006-s.png"]
    assert "mask is 20x20" in why["Masks/mask_0008-s.png"]
    assert "not binary" in why["Masks/mask_0012-s.png"]
    assert "zero-byte" in why["Images/bus_0011-l.png"]
    assert "Images/bus_0010-s.png" in images  # 0/129: two values, binary
    assert "Images/bus_0011-r.png" in images and "Images/bus_0001-l.png" in images
    # the whole CSV without Pathology: nothing can be converted, one clear line
    (root / "bus_data.csv").write_text("ID,Case\nbus_0001-l,1\n")
    assert run("busbra", "--root", root, "--output", tmp_path / "out2") == 2


# ---------------------------------------------------------------------------------------------- k folds
def test_kfold_every_image_tested_once_and_groups_never_straddle(tmp_path):
    truth = make_busbra(tmp_path / "root", n_cases=15)
    tested = []
    for k in range(3):
        out = tmp_path / f"fold{k}"
        assert run("busbra", "--root", tmp_path / "root", "--output", out, "--folds", "3", "--fold", k,
                   "--seed", "4", *NO_NEAR_DUPS) == 0
        images, _, report = load(out)
        assert report["split"]["method"] == "kfold" and (report["split"]["folds"], report["split"]["fold"]) == (3, k)
        assert len(images) == len(truth)
        splits_of_group = {}
        for im in images.values():
            splits_of_group.setdefault(im["group"], set()).add(im["split"])
        assert all(len(s) == 1 for s in splits_of_group.values())
        tested += [s for s, im in images.items() if im["split"] == "test"]
        assert {im["split"] for im in images.values()} == {"train", "val", "test"}
    assert sorted(tested) == sorted(f"Images/{i}.png" for i in truth)  # each image tested exactly once


# ---------------------------------------------------------------------------------------------- masks
def test_mask_folders_patterns_colours_table_and_zero_split(tmp_path, monkeypatch):
    imgs, masks = tmp_path / "images", tmp_path / "masks"
    truth = {}
    for i in range(6):
        kinds = ("benign", "benign") if i == 0 else (("malignant",) if i % 2 else ("benign",))
        rgb, ms, boxes = phantom(50 + i, kinds)
        write_png(imgs / f"img{i}.png", rgb)
        colour = np.zeros(SIZE + (3,), np.uint8)
        for m, kind in zip(ms, kinds):
            colour[m > 0] = (0, 255, 0) if kind == "benign" else (255, 0, 0)
            write_png(masks / f"img{i}_mask{len(truth.get(f'img{i}.png', []))}.png", m)
            truth.setdefault(f"img{i}.png", []).append((kind, boxes[len(truth.get(f'img{i}.png', []))]))
        write_png(masks / "colour" / f"img{i}.png", colour)
    write_png(masks / "stray_mask0.png", np.zeros(SIZE, np.uint8))  # matches no image
    write_png(imgs / "extra.png", phantom(99, ())[0])  # an image without a table row
    with open(tmp_path / "table.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "label", "patient", "device"])
        w.writerows([[f"img{i}", "malignant" if i % 2 else "benign", f"MRN-{i // 2}", "X"] for i in range(6)])
        w.writerow(["img9", "benign", "MRN-9", "X"])  # row without image
    # several binary masks per image, a table with label/patient/attribute (patients need a key)
    argv = ["masks", "--images", imgs, "--masks", masks, "--mask-pattern", "{stem}_mask*.png", "--table",
            tmp_path / "table.csv", "--attributes", "device", "--classes", "benign,malignant"]
    monkeypatch.delenv("USDET_PSEUDONYM_KEY", raising=False)
    assert run(*argv, "--output", tmp_path / "nokey") == 2
    (tmp_path / "key").write_text("k" * 32)
    assert run(*argv, "--output", tmp_path / "out", "--key-file", tmp_path / "key") == 0
    images, anns, report = load(tmp_path / "out")
    assert set(images) == set(truth)
    for f, lesions in truth.items():
        im = images[f]
        got = sorted((a["category_id"], a["bbox"]) for a in anns[im["id"]])
        assert got == sorted(({"benign": 1, "malignant": 2}[k], b) for k, b in lesions)
        assert im["device"] == "X" and im["patient"] == im["group"] and len(im["patient"]) >= 8
        assert "MRN" not in json.dumps(im)
    assert images["img0.png"]["group"] == images["img1.png"]["group"]  # one patient, one split
    assert images["img0.png"]["split"] == images["img1.png"]["split"]
    why = reasons(report)
    assert why["masks/stray_mask0.png"] == "mask matches no image"
    assert "not found" in why["table.csv row 8"]
    assert why["extra.png"] == "image without a row in table.csv"
    assert "MRN" not in (tmp_path / "out" / "report.json").read_text()
    # colour-coded class masks (BUS-UCLM convention), no table; --split 0,0,1 writes only test.json
    assert run("masks", "--images", imgs, "--masks", masks / "colour", "--mask-pattern", "{stem}.png",
               "--mask-colors", "0,255,0=benign;255,0,0=malignant", "--classes", "benign,malignant",
               "--split", "0,0,1", "--output", tmp_path / "colour") == 0
    assert sorted(os.listdir(tmp_path / "colour" / "annotations")) == ["test.json"]
    images, anns, report = load(tmp_path / "colour")
    assert set(report["counts"]) == {"test", "total"}
    for f, lesions in truth.items():
        im = images[f]
        got = sorted((a["category_id"], a["bbox"]) for a in anns[im["id"]])
        assert got == sorted(({"benign": 1, "malignant": 2}[k], b) for k, b in lesions), f
        assert im["label"] == lesions[0][0]
    assert images["extra.png"]["label"] == "normal" and not anns.get(images["extra.png"]["id"])  # no mask: negative
    from usdet.data.register import register_all_usdet_datasets

    assert register_all_usdet_datasets(str(tmp_path / "colour_root")) == []
    os.makedirs(tmp_path / "colour_root")
    os.symlink(tmp_path / "colour", tmp_path / "colour_root" / "uclm")
    assert register_all_usdet_datasets(str(tmp_path / "colour_root")) == ["uclm_test"]


# ---------------------------------------------------------------------------------------------- light imports
def test_converter_and_cropper_imports_load_no_torch(tmp_path):
    """Importing the converters, the cropper, their tools (and `import usdet.data`) loads neither torch nor
    detectron2, and a conversion's worker processes start without them."""
    make_busbra(tmp_path / "root", n_cases=3)
    code = f"""
import sys, runpy
sys.path.insert(0, {os.path.join(REPO, 'tools')!r})
import usdet.data, usdet.data.crop, usdet.data.convert, usdet.data.busi, usdet.data.breast, usdet.data.busbra
import usdet.data.mask_folders, usdet.data.frames
import convert_to_coco, crop_workspace
assert convert_to_coco.NEAR_DUP_CORR == usdet.data.duplicates.NEAR_DUP_CORR
assert convert_to_coco.NEAR_DUP_HAMMING == usdet.data.duplicates.NEAR_DUP_HAMMING
import usdet.data.convert_image as core
orig = core.process_image
def spy(job):  # runs in the worker processes: a loaded torch fails the image, and so the test
    if "torch" in sys.modules or "detectron2" in sys.modules:
        raise RuntimeError("torch in a converter worker")
    return orig(job)
core.process_image = spy
rc = convert_to_coco.main(["busbra", "--root", {str(tmp_path / 'root')!r}, "--output", {str(tmp_path / 'out')!r},
                           "--workers", "2", "--no-progress"])
assert rc == 0, rc
import json
report = json.load(open({str(tmp_path / 'out' / 'report.json')!r}))
assert report["skipped"] == [] and report["counts"]["total"]["images"] == 5, report["skipped"]
print(sorted(m for m in ("torch", "detectron2") if m in sys.modules))
"""
    env = dict(os.environ, USDET_DATASETS=str(tmp_path), PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_frames_folds_by_patient(tmp_path):
    """The hospital converter's --folds K --fold k: each frame tested once, a patient never straddles."""
    from test_frames import build_set, write_csv

    rows, _ = build_set(str(tmp_path / "src"), seed=5)
    write_csv(tmp_path / "boxes.csv", rows)
    (tmp_path / "key").write_text("k" * 32)
    tested = []
    for k in range(2):
        out = tmp_path / f"fold{k}"
        assert run("frames", "--images", tmp_path / "src", "--annotations", tmp_path / "boxes.csv", "--output", out,
                   "--key-file", tmp_path / "key", "--folds", "2", "--fold", k) == 0
        report = json.load(open(out / "report.json"))
        assert report["split"]["method"] == "kfold" and report["split"]["fold"] == k
        split_of_patient = {}
        for s in ("train", "val", "test"):
            for im in json.load(open(out / "annotations" / f"{s}.json"))["images"]:
                split_of_patient.setdefault(im["patient"], set()).add(s)
                if s == "test":
                    tested.append(im["source_file"])
        assert all(len(v) == 1 for v in split_of_patient.values())
    assert len(tested) == len(set(tested)) == len({r[0] for r in rows})  # rows are boxes; 20 frames
