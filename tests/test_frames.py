"""Hospital frames -> COCO: CSV and COCO-JSON ingestion with exact crop offsets, clipped/dropped
boxes, negatives, patient-level split, and the converter's refusals."""
import csv
import json
import os

import cv2
import numpy as np

from usdet.data.crop import find_image_region
from usdet.data.frames import convert_frames, shift_box
from usdet.data.screens import make_screen
from train_helpers import load_tool

KEY = b"test-key-0123456789"
PATIENTS = ["SMITH_J_MRN1001", "DOE_A_MRN1002", "ROE_B_MRN1003", "POE_C_MRN1004", "LOE_D_MRN1005"]


def build_set(root, seed=0):
    """5 patients x 2 clips x 2 frames of synthetic screens; returns rows (file, box, label, patient, clip)."""
    rng = np.random.default_rng(seed)
    rows, truth = [], {}
    for p in PATIENTS:
        for c in ("clip1", "clip2"):
            for k in range(2):
                s = make_screen(rng, canvas=(560, 420), jpeg_quality=0, gain=1.0, probe="linear")
                rel = f"{p}/{c}/frame_{k}.png"
                os.makedirs(os.path.join(root, p, c), exist_ok=True)
                cv2.imwrite(os.path.join(root, rel), s.frame[:, :, ::-1])
                truth[rel] = s
                label = "malignant" if p.endswith(("1", "3")) else "benign"
                if s.lesion_boxes and k == 0:
                    for b in s.lesion_boxes:
                        rows.append((rel, b, label, p, c))
                else:
                    rows.append((rel, None, "", p, c))
    return rows, truth


def write_csv(path, rows, extra=()):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "x0", "y0", "x1", "y1", "label", "patient_id", "clip_id"])
        for rel, b, label, p, c in list(rows) + list(extra):
            w.writerow([rel, *(b if b is not None else ["", "", "", ""]), label, p, c])


def load(out):
    docs = {s: json.load(open(os.path.join(out, "annotations", f"{s}.json"))) for s in ("train", "val", "test")}
    return docs, json.load(open(os.path.join(out, "report.json")))


def test_shift_box_exact():
    assert shift_box((110, 60, 150, 90), (100, 50, 300, 250), 0.5) == ([10.0, 10.0, 40.0, 30.0], "kept")
    assert shift_box((90, 60, 150, 90), (100, 50, 300, 250), 0.5) == ([0.0, 10.0, 50.0, 30.0], "clipped")
    assert shift_box((10, 10, 60, 40), (100, 50, 300, 250), 0.5) == (None, "dropped")
    assert shift_box((60, 60, 120, 90), (100, 50, 300, 250), 0.5) == (None, "dropped")  # 1/3 visible


def test_csv_conversion(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    rows, truth = build_set(str(src))
    # one box half in the GUI (clipped) and one wholly in the GUI (dropped), on a known frame
    rel0 = f"{PATIENTS[0]}/clip1/frame_0.png"
    crop0 = find_image_region(truth[rel0].frame).box
    assert crop0 is not None
    x0, y0 = crop0[0], crop0[1]
    extra = [(rel0, (x0 - 10, y0 + 20, x0 + 30, y0 + 50), "malignant", PATIENTS[0], "clip1"),
             (rel0, (2, 2, 12, 12), "malignant", PATIENTS[0], "clip1")]
    write_csv(tmp_path / "boxes.csv", rows, extra)
    report = convert_frames(str(src), str(tmp_path / "boxes.csv"), str(out), KEY, classes=["benign", "malignant"],
                            seed=0, progress=False)
    docs, rep = load(str(out))
    assert rep == json.loads(json.dumps(report))
    c = rep["counts"]
    assert c["images"] + c["refused"] == len(truth) and c["failed"] == 0
    assert c["boxes_clipped"] >= 1 and c["boxes_dropped"] >= 1
    mapping = {}
    for split, doc in docs.items():
        assert [cat["name"] for cat in doc["categories"]] == ["benign", "malignant"]
        for im in doc["images"]:
            assert im["file_name"].startswith(f"images/{split}/") and im["patient"] == im["group"]
            mapping[im["source_file"]] = (split, im, [a for a in doc["annotations"] if a["image_id"] == im["id"]])
    # recover which output is which source via the keyed pseudonym
    from usdet.data.privacy import Pseudonymizer

    pseudo = Pseudonymizer(KEY)
    checked_boxes = 0
    for rel, s in truth.items():
        name = pseudo(rel, "img")
        if name not in mapping:
            continue  # refused by the cropper
        split, im, anns = mapping[name]
        cx0, cy0, cx1, cy1 = im["crop_box"]
        assert (im["width"], im["height"]) == (cx1 - cx0, cy1 - cy0)
        written = cv2.imread(os.path.join(str(out), im["file_name"]))[:, :, ::-1]
        assert np.array_equal(written, s.frame[cy0:cy1, cx0:cx1])  # exact crop, no off-by-one
        my_rows = [r for r in rows if r[0] == rel and r[1] is not None]
        if rel == rel0:
            assert len(anns) == len(my_rows) + 1  # + the clipped one; the dropped one is gone
            clipped = [a for a in anns if a["bbox"][0] == 0.0]
            assert clipped and clipped[0]["bbox"][2:] == [30.0, 30.0]
        else:
            assert len(anns) == len(my_rows)
        if not my_rows:
            assert im["label"] == "normal" and not anns
        for (_, b, label, _, _), a in zip(my_rows, anns):
            assert a["bbox"] == [b[0] - cx0, b[1] - cy0, b[2] - b[0], b[3] - b[1]]  # exact shift
            assert a["category_id"] == (2 if label == "malignant" else 1)
            checked_boxes += 1
    assert checked_boxes >= 4
    # patient-level split: no patient in two splits, clips stay together
    per_split = {s: {im["patient"] for im in docs[s]["images"]} for s in docs}
    assert not (per_split["train"] & per_split["val"]) and not (per_split["train"] & per_split["test"])
    assert not (per_split["val"] & per_split["test"])
    clip_split = {}
    for s, doc in docs.items():
        for im in doc["images"]:
            assert clip_split.setdefault(im["clip"], s) == s
    assert len(set().union(*per_split.values())) >= 4
    stats = json.load(open(os.path.join(str(out), "pixel_stats.json")))
    assert stats["split"] == "train" and stats["num_images"] == len(docs["train"]["images"])


def test_coco_json_matches_csv(tmp_path):
    src = tmp_path / "src"
    rows, truth = build_set(str(src), seed=1)
    write_csv(tmp_path / "boxes.csv", rows)
    images, anns = [], []
    ids = {}
    for rel in sorted(truth):
        ids[rel] = len(ids) + 1
        h, w = truth[rel].frame.shape[:2]
        images.append({"id": ids[rel], "file_name": rel, "width": w, "height": h})
    for rel, b, label, _, _ in rows:
        if b is not None:
            anns.append({"id": len(anns) + 1, "image_id": ids[rel], "category_id": 1 if label == "benign" else 2,
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
    coco = {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "benign"}, {"id": 2, "name": "malignant"}]}
    (tmp_path / "cvat.json").write_text(json.dumps(coco))
    convert_frames(str(src), str(tmp_path / "boxes.csv"), str(tmp_path / "a"), KEY, classes=["lesion"],
                   progress=False)
    convert_frames(str(src), str(tmp_path / "cvat.json"), str(tmp_path / "b"), KEY, classes=["lesion"],
                   progress=False)
    da, _ = load(str(tmp_path / "a"))
    db, _ = load(str(tmp_path / "b"))
    for s in da:
        ka = {im["source_file"]: (im["crop_box"], im["patient"]) for im in da[s]["images"]}
        kb = {im["source_file"]: (im["crop_box"], im["patient"]) for im in db[s]["images"]}
        assert ka == kb  # patient from the first folder == patient_id column
        assert [a["bbox"] for a in da[s]["annotations"]] == [a["bbox"] for a in db[s]["annotations"]]
        assert all(a["category_id"] == 1 for a in db[s]["annotations"])


def _frames_cli(args):
    return load_tool("convert_to_coco").run_frames(args)


def _args(tmp_path, **kw):
    argv = ["frames", "--images", str(tmp_path / "src"), "--annotations", str(tmp_path / "boxes.csv"),
            "--output", str(tmp_path / "out"), "--no-progress"]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return load_tool("convert_to_coco").build_parser().parse_args(argv)


def test_refusals(tmp_path, monkeypatch, capsys):
    rows, _ = build_set(str(tmp_path / "src"), seed=2)
    write_csv(tmp_path / "boxes.csv", rows[:3])
    monkeypatch.delenv("USDET_PSEUDONYM_KEY", raising=False)
    assert _frames_cli(_args(tmp_path)) == 2
    assert "no pseudonym key" in capsys.readouterr().err
    (tmp_path / "key").write_bytes(KEY)
    assert _frames_cli(_args(tmp_path, key_file=tmp_path / "key", mapping=tmp_path / "out" / "map.json")) == 2
    assert "outside" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    bad = tmp_path / "bad.csv"
    bad.write_text("file,x0,y0\na.png,1,2\n")
    args = _args(tmp_path, key_file=tmp_path / "key")
    args.annotations = str(bad)
    assert _frames_cli(args) == 2
    assert "lacks column" in capsys.readouterr().err
    monkeypatch.setenv("USDET_PSEUDONYM_KEY", KEY.decode())
    assert _frames_cli(_args(tmp_path, mapping=tmp_path / "map.json")) == 0
    mp = json.load(open(tmp_path / "map.json"))
    assert set(mp["files"].values()) == {r[0] for r in rows[:3]}
