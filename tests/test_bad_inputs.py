"""Bad inputs through every entry point: each gets a clear message naming the file and the problem,
the valid inputs' results are kept, and the exit status is non-zero only where nothing useful
could be done.

One corpus of awkward files (zero-byte, truncated, non-image, mislabelled extension, 16-bit,
palette, RGBA, 1-bit, CMYK JPEG, 1x1, a 20000x20000 decompression bomb that is a few KB on disk,
a DICOM without pixel data) is fed, beside good frames, to the image reader, the BUSI and
hospital-frames converters, the workspace cropping tool and the predictor; each tool runs once
per module and every case is its own parametrization. Then BUSI mask problems, the cropper on
odd arrays, train_net's dataset loading (broken COCO JSONs, unknown config keys, unregistered
names) and evaluate_json (broken predictions and ground truth).
"""
from __future__ import annotations

import copy
import csv
import json
import logging
import os
import struct
import sys
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image
from train_helpers import REPO, QUICK_CFG, load_tool

H, W = 48, 64  # every corpus image (tiny: the suite runs on 2 shared cores)


# ----------------------------------------------------------------------------------------------
# the corpus
# ----------------------------------------------------------------------------------------------
def texture(seed: int) -> np.ndarray:
    """A speckled gray frame (HxW uint8, values 30..220): varied enough that no border looks flat."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    base = 60 + 1.5 * xx + 1.2 * yy + 25 * np.sin(xx / 5.0) * np.cos(yy / 4.0)
    return np.clip(base + rng.normal(0, 6, (H, W)), 30, 220).astype(np.uint8)


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def write_bomb_png(path: str, w: int = 20000, h: int = 20000) -> None:
    """A valid, all-black 1-bit PNG of w x h whose file is ~50 KB (zero rows compress ~1000:1)."""
    row = b"\x00" * (1 + (w + 7) // 8)
    comp = zlib.compressobj(9)
    parts = [comp.compress(row * 1000) for _ in range(h // 1000)]
    parts += [comp.compress(row * (h % 1000)), comp.flush()]
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
                 + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b""))


def write_dicom_without_pixels(path: str) -> None:
    from usdet.data.dicom import write_ultrasound_dicom

    write_ultrasound_dicom(path, None, PatientID="PX")


def _png(arr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", arr)
    assert ok
    return buf.tobytes()


# Each case: file name (neutral: the hospital converter redacts path words from messages), how to
# write it from a gray frame g, and either the words its failure message must contain or the RGB
# array it must decode to with the allowed mean absolute error (lossy formats).
def _expect_gray(g):
    return np.dstack([g, g, g])


def _rescaled(g):
    lo, hi = float(g.min()), float(g.max())
    return _expect_gray(np.clip((g.astype(np.float64) - lo) * 255.0 / (hi - lo) + 0.5, 0, 255).astype(np.uint8))


def _dithered(g):
    """A 1-bit rendering of g (bool array; Floyd-Steinberg, as scanners' 1-bit exports)."""
    return np.asarray(Image.fromarray(g).convert("1")).astype(bool)


CASES = {
    "zero_byte": dict(name="case_a.png", write=lambda p, g: open(p, "wb").close(), fail=["zero-byte"]),
    "truncated": dict(name="case_b.png", write=lambda p, g: open(p, "wb").write(_png(g)[: len(_png(g)) // 2]),
                      fail=["truncated"]),
    "non_image": dict(name="case_c.png", write=lambda p, g: open(p, "w").write("a text file, not a PNG\n"),
                      fail=["not an image"]),
    "one_pixel": dict(name="case_d.png", write=lambda p, g: Image.fromarray(g[:1, :1]).save(p), fail=["1x1"]),
    "bomb_20000x20000": dict(name="case_e.png", write=lambda p, g: write_bomb_png(p), fail=["decompression"]),
    "dicom_without_pixels": dict(name="case_f.dcm", write=lambda p, g: write_dicom_without_pixels(p),
                                 fail=["no pixel data"]),
    "jpeg_named_png": dict(name="case_g.png", write=lambda p, g: cv2.imwrite(p + ".jpg", g) and os.replace(p + ".jpg", p),
                           expect=_expect_gray, tol=2.0),
    "sixteen_bit": dict(name="case_h.png", write=lambda p, g: Image.fromarray(g.astype(np.uint16) * 257).save(p),
                        expect=_rescaled, tol=0.51),
    "palette": dict(name="case_i.png",
                    write=lambda p, g: Image.fromarray(g).convert("P", palette=Image.ADAPTIVE, colors=32).save(p),
                    expect=_expect_gray, tol=6.0),
    "rgba": dict(name="case_j.png",
                 write=lambda p, g: Image.fromarray(np.dstack([g, g, g, np.full_like(g, 180)]), "RGBA").save(p),
                 expect=_expect_gray, tol=0.0),
    "one_bit": dict(name="case_k.png", write=lambda p, g: Image.fromarray(_dithered(g)).save(p),
                    expect=lambda g: _expect_gray(_dithered(g).astype(np.uint8) * 255), tol=0.0),
    "cmyk_jpeg": dict(name="case_l.jpg",
                      write=lambda p, g: Image.fromarray(_expect_gray(g)).convert("CMYK").save(p, "JPEG", quality=95),
                      expect=_expect_gray, tol=3.0),
}
FAIL_CASES = sorted(k for k, c in CASES.items() if "fail" in c)
STILL_CASES = sorted(k for k in CASES if k != "dicom_without_pixels")


def write_corpus(folder: str, seed0: int = 100, cases=tuple(CASES)) -> dict:
    """Write the cases into ``folder``; returns {case: (path, expected RGB or None)}."""
    os.makedirs(folder, exist_ok=True)
    out = {}
    for i, case in enumerate(sorted(cases)):
        c = CASES[case]
        g = texture(seed0 + i)
        path = os.path.join(folder, c["name"])
        c["write"](path, g)
        out[case] = (path, c["expect"](g) if "expect" in c else None)
    return out


def assert_close(got: np.ndarray, want: np.ndarray, tol: float, what: str) -> None:
    got = np.asarray(got)
    if got.ndim == 2:
        got = np.dstack([got, got, got])
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    err = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).mean())
    assert err <= tol, f"{what}: mean abs error {err:.2f} > {tol}"


def assert_reason(reason: str, case: str) -> None:
    for word in CASES[case]["fail"]:
        assert word in reason, f"{case}: reason {reason!r} should mention {word!r}"


# ----------------------------------------------------------------------------------------------
# the image reader every tool uses
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(str(tmp_path_factory.mktemp("corpus")))


def test_bomb_file_is_tiny(corpus):
    path = corpus["bomb_20000x20000"][0]
    assert os.path.getsize(path) < 200_000
    with open(path, "rb") as fh:
        head = fh.read(24)
    assert head[12:16] == b"IHDR" and struct.unpack(">II", head[16:24]) == (20000, 20000)
    data = open(path, "rb").read()
    (n,) = struct.unpack(">I", data[33:37])  # the IDAT chunk after the 8-byte signature and IHDR
    assert data[37:41] == b"IDAT"
    assert len(zlib.decompress(data[41:41 + n])) == 20000 * (1 + 20000 // 8)  # a genuine, complete image


@pytest.mark.parametrize("case", STILL_CASES)
def test_read_image(corpus, case):
    from usdet.data.image_io import ImageReadError, read_image

    path, want = corpus[case]
    if want is None:
        with pytest.raises(ImageReadError) as e:
            read_image(path)
        assert e.value.path == path and str(e.value).startswith(path)
        assert_reason(e.value.reason, case)
    else:
        assert_close(read_image(path), want, CASES[case]["tol"], case)


# ----------------------------------------------------------------------------------------------
# BUSI converter: the corpus inside a BUSI layout, plus mask problems
# ----------------------------------------------------------------------------------------------
BOX = (10, 12, 30, 22)  # x0, y0, x1, y1 (exclusive) of every corpus image's mask


def _mask(box=BOX, shape=(H, W), value=255, dtype=np.uint8):
    m = np.zeros(shape, dtype)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = value
    return m


# mask cases: (files written beside a good image "benign (<n>).png"), expected outcome
MASK_CASES = {
    "wrong_size": (lambda s: {f"{s}_mask.png": _png(_mask(shape=(40, 40)))}, ("skip", "_mask.png", ["40x40", "64x48"])),
    "all_empty_lesion": (lambda s: {f"{s}_mask.png": _png(_mask(value=0))}, ("skip", ".png", ["all empty"])),
    "zero_byte_mask": (lambda s: {f"{s}_mask.png": b""}, ("skip", "_mask.png", ["zero-byte"])),
    "missing_mask": (lambda s: {}, ("skip", ".png", ["mask missing"])),
    "truncated_mask": (lambda s: {f"{s}_mask.png": _png(_mask())[:60]}, ("skip", "_mask.png", ["unreadable"])),
    "one_empty_of_two": (lambda s: {f"{s}_mask.png": _png(_mask()), f"{s}_mask_1.png": _png(_mask(value=0))},
                         ("ok", 1, "empty mask")),
    "sixteen_bit_mask": (lambda s: {f"{s}_mask.png": _png(_mask(value=65535, dtype=np.uint16))}, ("ok", 1, None)),
    "zero_one_mask": (lambda s: {f"{s}_mask.png": _png(_mask(value=1))}, ("ok", 1, None)),
    "two_masks": (lambda s: {f"{s}_mask.png": _png(_mask()), f"{s}_mask_1.png": _png(_mask((40, 30, 50, 40)))},
                  ("ok", 2, None)),
}


@pytest.fixture(scope="module")
def busi_run(tmp_path_factory):
    """Convert a synthetic BUSI root holding good images, the corpus and the mask cases, once."""
    convert_to_coco = load_tool("convert_to_coco")
    root = tmp_path_factory.mktemp("busi_root")
    for c in ("benign", "malignant", "normal"):
        (root / c).mkdir()
    good = {}
    for i, label in enumerate(["benign", "benign", "malignant", "malignant", "normal", "normal"]):
        name = f"{label} ({i + 1})"
        cv2.imwrite(str(root / label / f"{name}.png"), texture(i))
        cv2.imwrite(str(root / label / f"{name}_mask.png"), _mask(value=255 if label != "normal" else 0))
        good[f"{label}/{name}.png"] = label
    # corpus images are benign images with a valid mask each (the image is the problem)
    files = write_corpus(str(root / "benign"), seed0=200, cases=STILL_CASES)
    for case, (path, _) in files.items():
        cv2.imwrite(os.path.splitext(path)[0] + "_mask.png", _mask())
    for k, case in enumerate(sorted(MASK_CASES)):
        stem = f"benign ({50 + k})"
        cv2.imwrite(str(root / "benign" / f"{stem}.png"), texture(300 + k))
        for fname, data in MASK_CASES[case][0](stem).items():
            (root / "benign" / fname).write_bytes(data)
    (root / "benign" / "notes.txt").write_text("not an image")
    out = tmp_path_factory.mktemp("busi_out")
    rc = convert_to_coco.main(["busi", "--root", str(root), "--output", str(out), "--no-progress",
                               "--classes", "benign,malignant"])
    report = json.loads((out / "report.json").read_text())
    images, anns = {}, {}
    for split in ("train", "val", "test"):
        doc = json.loads((out / "annotations" / f"{split}.json").read_text())
        for im in doc["images"]:
            images[im["source_file"]] = im
        for a in doc["annotations"]:
            anns.setdefault(a["image_id"], []).append(a)
    return dict(rc=rc, root=root, out=out, report=report, images=images, anns=anns, files=files, good=good)


def test_busi_valid_images_kept(busi_run):
    r = busi_run
    assert r["rc"] == 0
    for rel, label in r["good"].items():
        im = r["images"][rel]
        assert im["label"] == label and (im["width"], im["height"]) == (W, H)
        boxes = [a["bbox"] for a in r["anns"].get(im["id"], [])]
        assert boxes == ([] if label == "normal" else [[10, 12, 20, 10]])
        assert_close(cv2.imread(str(r["out"] / im["file_name"]), cv2.IMREAD_UNCHANGED),
                     _expect_gray(cv2.imread(str(r["root"] / rel), cv2.IMREAD_GRAYSCALE)), 0.0, rel)
    skipped = {s["file"] for s in r["report"]["skipped"]}
    assert "benign/notes.txt" in skipped
    assert r["report"]["counts"]["total"]["images"] == len(r["images"])


@pytest.mark.parametrize("case", STILL_CASES)
def test_busi_converter(busi_run, case):
    r = busi_run
    rel = "benign/" + CASES[case]["name"]
    skipped = {s["file"]: s["reason"] for s in r["report"]["skipped"]}
    path, want = r["files"][case]
    if want is None:
        assert rel in skipped, f"{rel} should be reported as skipped"
        assert_reason(skipped[rel], case)
        assert rel not in r["images"]
    else:
        assert rel not in skipped, skipped.get(rel)
        im = r["images"][rel]
        written = cv2.imread(str(r["out"] / im["file_name"]), cv2.IMREAD_UNCHANGED)
        if written.ndim == 3:
            written = written[:, :, ::-1]
        assert_close(written, want, CASES[case]["tol"], case)
        assert [a["bbox"] for a in r["anns"][im["id"]]] == [[10, 12, 20, 10]]


@pytest.mark.parametrize("case", sorted(MASK_CASES))
def test_busi_mask_problems(busi_run, case):
    r = busi_run
    stem = f"benign/benign ({50 + sorted(MASK_CASES).index(case)})"
    outcome = MASK_CASES[case][1]
    skipped = {s["file"]: s["reason"] for s in r["report"]["skipped"]}
    if outcome[0] == "skip":
        _, suffix, words = outcome
        rel = stem + suffix
        assert rel in skipped, f"{rel} should be reported; skipped: {sorted(skipped)}"
        for w in words:
            assert w in skipped[rel]
        assert stem + ".png" not in r["images"]
    else:
        _, n_boxes, note = outcome
        im = r["images"][stem + ".png"]
        boxes = sorted(a["bbox"] for a in r["anns"][im["id"]])
        want = [[10, 12, 20, 10], [40, 30, 10, 10]][:n_boxes]
        assert boxes == sorted(want)
        if note:
            notes = [n["note"] for n in r["report"]["notes"] if n["file"].startswith(stem + "_mask")]
            assert any(note in n for n in notes), notes


def test_busi_wrong_root_fails_with_layout(tmp_path, capsys):
    convert_to_coco = load_tool("convert_to_coco")
    (tmp_path / "images").mkdir()
    rc = convert_to_coco.main(["busi", "--root", str(tmp_path), "--output", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and str(tmp_path) in err and "benign/" in err
    assert not (tmp_path / "out" / "annotations").exists()


# ----------------------------------------------------------------------------------------------
# hospital frames converter, workspace cropping tool, predictor: corpus + good screens
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory):
    """The corpus plus two good synthetic scanner screens (true image boxes known)."""
    from usdet.data.screens import make_screen

    d = tmp_path_factory.mktemp("frames")
    files = write_corpus(str(d), seed0=400)
    rng = np.random.default_rng(5)
    screens = {}
    for i in range(2):
        s = make_screen(rng, canvas=(240, 180), probe="linear", theme="dark", gain=1.0, doppler=False,
                        jpeg_quality=0)
        cv2.imwrite(str(d / f"good_{i}.png"), s.frame[:, :, ::-1])
        screens[f"good_{i}.png"] = s
    return dict(dir=d, files=files, screens=screens)


def _iou(a, b):
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    u = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ix * iy / u


KEY = "bad-inputs-test-key-0123456789"


@pytest.fixture(scope="module")
def frames_run(frames_dir, tmp_path_factory):
    d = frames_dir["dir"]
    ann = tmp_path_factory.mktemp("frames_ann") / "boxes.csv"
    rows = []
    for i, (name, s) in enumerate(sorted(frames_dir["screens"].items())):
        x0, y0, x1, y1 = s.box
        rows.append([name, x0 + 5, y0 + 5, x0 + 25, y0 + 20, "lesion", f"P{i}"])
    for case in sorted(CASES):
        rows.append([CASES[case]["name"], 10, 12, 30, 22, "lesion", "PB"])
    with open(ann, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "x0", "y0", "x1", "y1", "label", "patient_id"])
        w.writerows(rows)
    out = tmp_path_factory.mktemp("frames_out")
    key_file = ann.parent / "key.txt"
    key_file.write_text(KEY)
    convert_to_coco = load_tool("convert_to_coco")
    args = convert_to_coco.build_parser().parse_args(["frames", "--images", str(d), "--annotations", str(ann), "--output", str(out),
                          "--key-file", str(key_file), "--no-progress"])
    rc = convert_to_coco.run_frames(args)
    report = json.loads((out / "report.json").read_text())
    images = {}
    for split in ("train", "val", "test"):
        doc = json.loads((out / "annotations" / f"{split}.json").read_text())
        for im in doc["images"]:
            images[im["source_file"]] = (im, [a for a in doc["annotations"] if a["image_id"] == im["id"]])
    from usdet.data.privacy import Pseudonymizer, load_key

    pseudo = Pseudonymizer(load_key(str(key_file)))
    return dict(rc=rc, out=out, report=report, images=images, pseudo=pseudo)


def test_frames_valid_frames_kept(frames_run, frames_dir):
    r = frames_run
    assert r["rc"] == 0
    for name, s in frames_dir["screens"].items():
        im, anns = r["images"][r["pseudo"](name, "img")]
        assert _iou(im["crop_box"], s.box) >= 0.9
        x0, y0 = im["crop_box"][:2]
        assert [a["bbox"] for a in anns] == [[s.box[0] + 5 - x0, s.box[1] + 5 - y0, 20, 15]]


@pytest.mark.parametrize("case", sorted(CASES))
def test_frames_converter(frames_run, frames_dir, case):
    r = frames_run
    pseudo_name = r["pseudo"](CASES[case]["name"], "img")
    failed = {f["source"]: f["reason"] for f in r["report"]["failed"]}
    path, want = frames_dir["files"][case]
    if want is None:
        assert pseudo_name in failed, f"{case} ({pseudo_name}) should be listed as failed: {failed}"
        assert_reason(failed[pseudo_name], case)
        assert pseudo_name not in r["images"]
    else:
        assert pseudo_name not in failed, failed.get(pseudo_name)
        im, anns = r["images"][pseudo_name]
        written = cv2.imread(str(r["out"] / im["file_name"]), cv2.IMREAD_COLOR)[:, :, ::-1]
        x0, y0, x1, y1 = im["crop_box"]
        assert_close(written, want[y0:y1, x0:x1], CASES[case]["tol"], case)


@pytest.fixture(scope="module")
def crop_run(frames_dir, tmp_path_factory):
    crop_workspace = load_tool("crop_workspace")
    out = tmp_path_factory.mktemp("crop_out")
    rc = crop_workspace.main(["--input", str(frames_dir["dir"]), "--output", str(out), "--no-progress"])
    return dict(rc=rc, out=out, crops=json.loads((out / "crops.json").read_text()))


def test_crop_workspace_valid_frames_kept(crop_run, frames_dir):
    assert crop_run["rc"] == 0
    for name, s in frames_dir["screens"].items():
        e = crop_run["crops"][name]
        assert _iou(e["box"], s.box) >= 0.9
        x0, y0, x1, y1 = e["box"]
        got = cv2.imread(str(crop_run["out"] / e["output"]), cv2.IMREAD_COLOR)[:, :, ::-1]
        np.testing.assert_array_equal(got, s.frame[y0:y1, x0:x1])


@pytest.mark.parametrize("case", sorted(CASES))
def test_crop_workspace(crop_run, frames_dir, case):
    name = CASES[case]["name"]
    entry = crop_run["crops"].get(name)
    assert entry is not None, f"{name} missing from crops.json"
    path, want = frames_dir["files"][case]
    if want is None:
        assert entry["box"] is None and entry.get("failed") is True
        assert_reason(entry["reason"], case)
        assert not os.path.exists(crop_run["out"] / name)
    else:
        assert entry["box"] is not None, entry
        got = cv2.imread(str(crop_run["out"] / entry["output"]), cv2.IMREAD_COLOR)[:, :, ::-1]
        x0, y0, x1, y1 = entry["box"]
        lossy_again = 2.0 if entry["output"].lower().endswith(".jpg") else 0.0
        assert_close(got, want[y0:y1, x0:x1], CASES[case]["tol"] + lossy_again, case)


def test_crop_workspace_nothing_usable_exits_nonzero(tmp_path, capsys):
    crop_workspace = load_tool("crop_workspace")
    write_corpus(str(tmp_path / "in"), cases=["zero_byte", "truncated"])
    rc = crop_workspace.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--no-progress"])
    assert rc == 1
    assert "failed 2" in capsys.readouterr().out
    rc = crop_workspace.main(["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "out2")])
    assert rc == 2 and str(tmp_path / "nope") in capsys.readouterr().err


ODD_ARRAYS = {
    "1x1": np.zeros((1, 1, 3), np.uint8),
    "empty": np.zeros((0, 0, 3), np.uint8),
    "1d": np.zeros(100, np.uint8),
    "five_channels": np.zeros((50, 50, 5), np.uint8),
    "all_black": np.zeros((120, 160, 3), np.uint8),
    "all_white": np.full((120, 160, 3), 255, np.uint8),
    "all_nan": np.full((60, 80, 3), np.nan),
}


@pytest.mark.parametrize("case", sorted(ODD_ARRAYS))
def test_cropper_refuses_odd_arrays(case):
    import warnings

    from usdet.data.crop import find_image_region

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = find_image_region(ODD_ARRAYS[case])
    assert res.box is None and res.confidence == 0.0
    assert len(res.reason) > 10


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """The quick R18-FPN config with random weights (structure, not accuracy)."""
    import torch
    from detectron2.modeling import build_model

    from usdet.engine.predictor import build_predictor_cfg

    d = tmp_path_factory.mktemp("tiny_model")
    torch.manual_seed(0)
    model = build_model(build_predictor_cfg(QUICK_CFG, "", "cpu", []))
    weights = str(d / "model.pth")
    torch.save({"model": model.state_dict()}, weights)
    return QUICK_CFG, weights


def _predict_main(argv):
    predict = load_tool("predict")
    return predict.main(argv)


@pytest.fixture(scope="module")
def predict_run(frames_dir, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict_out")
    rc = _predict_main(["--config-file", tiny_model[0], "--weights", tiny_model[1], "--input", str(frames_dir["dir"]),
                        "--output", str(out), "--device", "cpu", "--no-progress", "--score-thresh", "0.0",
                        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"])
    return dict(rc=rc, records=json.loads((out / "predictions.json").read_text()),
                report=json.loads((out / "report.json").read_text()))


def test_predict_valid_frames_kept(predict_run, frames_dir):
    assert predict_run["rc"] == 0
    by_name = {os.path.basename(r["source"]): r for r in predict_run["records"]}
    for name, s in frames_dir["screens"].items():
        assert _iou(by_name[name]["crop_box"], s.box) >= 0.9
        assert by_name[name]["boxes"], "an untrained model with threshold 0 still returns boxes"
    ok = [c for c in CASES if "expect" in CASES[c]]
    assert predict_run["report"]["num_frames"] == len(frames_dir["screens"]) + len(ok) == len(predict_run["records"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_predict(predict_run, case):
    name = CASES[case]["name"]
    failed = {os.path.basename(f["source"]): f["reason"] for f in predict_run["report"]["failures"]}
    records = [r for r in predict_run["records"] if os.path.basename(r["source"]) == name]
    if "fail" in CASES[case]:
        assert name in failed and not records
        assert_reason(failed[name], case)
    else:
        assert name not in failed and len(records) == 1
        x0, y0, x1, y1 = records[0]["crop_box"]
        for b in records[0]["boxes"]:  # boxes map back inside the crop of the source frame
            bx = b["bbox_xyxy_original"]
            assert x0 - 1e-3 <= bx[0] <= bx[2] <= x1 + 1e-3 and y0 - 1e-3 <= bx[1] <= bx[3] <= y1 + 1e-3


def test_predict_config_with_unknown_key(tiny_model, tmp_path):
    import subprocess

    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f'_BASE_: "{QUICK_CFG}"\nMODEL:\n  NOT_A_KEY: 3\n')
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "predict.py"), "--config-file", str(cfg),
                           "--weights", tiny_model[1], "--input", str(tmp_path), "--output", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.returncode == 2
    assert str(cfg) in proc.stderr and "NOT_A_KEY" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


# ----------------------------------------------------------------------------------------------
# train_net: dataset loading, config and dataset names
# ----------------------------------------------------------------------------------------------
def _good_coco():
    return {
        "images": [{"id": i, "file_name": f"images/{i}.png", "width": W, "height": H} for i in (1, 2, 3)],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 12, 20, 10], "area": 200, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [5, 5, 10, 10], "area": 100, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "lesion"}],
    }


def _edit(fn):
    def make():
        d = _good_coco()
        fn(d)
        return d
    return make


# case -> (document maker, expected {image id: [boxes]} after loading, or the error words; message words)
COCO_CASES = {
    "negative_box": (_edit(lambda d: d["annotations"][0].update(bbox=[-5, -4, 20, 10])),
                     {1: [[0, 0, 15, 6]], 2: [[5, 5, 10, 10]], 3: []}, ["clipped", "1"]),
    "box_past_right_edge": (_edit(lambda d: d["annotations"][0].update(bbox=[60, 40, 20, 10])),
                            {1: [[60, 40, 4, 8]], 2: [[5, 5, 10, 10]], 3: []}, ["clipped"]),
    "box_wholly_outside": (_edit(lambda d: d["annotations"][0].update(bbox=[100, 100, 5, 5])),
                           {1: [], 2: [[5, 5, 10, 10]], 3: []}, ["wholly outside"]),
    "negative_width": (_edit(lambda d: d["annotations"][0].update(bbox=[10, 10, -20, 10])),
                       {1: [], 2: [[5, 5, 10, 10]], 3: []}, ["non-positive"]),
    "nan_box": (_edit(lambda d: d["annotations"][0].update(bbox=[10, 10, "x", 10])),
                {1: [], 2: [[5, 5, 10, 10]], 3: []}, ["4 finite numbers"]),
    "unknown_category": (_edit(lambda d: d["annotations"][0].update(category_id=7)),
                         {1: [], 2: [[5, 5, 10, 10]], 3: []}, ["category_id", "[1]"]),
    "duplicate_image_ids": (_edit(lambda d: d["images"][1].update(id=1)),
                            {3: []}, ["sharing their id", "1"]),
    "annotation_missing_bbox": (_edit(lambda d: d["annotations"][0].pop("bbox")),
                                {1: [], 2: [[5, 5, 10, 10]], 3: []}, ["missing"]),
    "image_missing_file_name": (_edit(lambda d: d["images"][0].pop("file_name")),
                                {2: [[5, 5, 10, 10]], 3: []}, ["file_name"]),
    "image_missing_size": (_edit(lambda d: [d["images"][2].pop("width"), d["images"][2].pop("height")]),
                           {1: [[10, 12, 20, 10]], 2: [[5, 5, 10, 10]], 3: []}, ["width/height", "read from"]),
    "annotation_of_unknown_image": (_edit(lambda d: d["annotations"][0].update(image_id=99)),
                                    {1: [], 2: [[5, 5, 10, 10]], 3: []}, ["unknown image_id"]),
    "duplicate_annotation_ids": (_edit(lambda d: d["annotations"][1].update(id=1)),
                                 {1: [[10, 12, 20, 10]], 2: [[5, 5, 10, 10]], 3: []}, ["renumbered"]),
    "missing_categories": (_edit(lambda d: d.pop("categories")), "'categories'", None),
    "not_json": (lambda: "{ this is not json", "not valid JSON", None),
    "a_list": (lambda: [], "expected a COCO object", None),
    "no_images_left": (_edit(lambda d: [im.pop("file_name") for im in d["images"]]), "no usable image", None),
}


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    d = tmp_path_factory.mktemp("coco_root")
    (d / "images").mkdir()
    for i in (1, 2, 3):
        cv2.imwrite(str(d / "images" / f"{i}.png"), texture(500 + i))
    return d


@pytest.mark.parametrize("case", sorted(COCO_CASES))
def test_train_dataset_loading(coco_root, case, caplog):
    from detectron2.data import DatasetCatalog

    from usdet.data.register import DatasetFormatError, register_usdet_dataset

    make, want, words = COCO_CASES[case]
    doc = make()
    path = coco_root / f"{case}.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    name = f"bad_inputs_{case}"
    if isinstance(want, str):  # nothing usable: a clear error naming the file (at registration or load)
        with pytest.raises(DatasetFormatError) as e:
            register_usdet_dataset(name, str(path), str(coco_root))
            DatasetCatalog.get(name)
        assert str(path) in str(e.value) and want in str(e.value)
        return
    register_usdet_dataset(name, str(path), str(coco_root))
    with caplog.at_level(logging.WARNING, logger="usdet.data.register"):
        dicts = DatasetCatalog.get(name)
    got = {d["image_id"]: sorted([round(v, 3) for v in a["bbox"]] for a in d["annotations"]) for d in dicts}
    assert got == {k: sorted(v) for k, v in want.items()}
    for d in dicts:
        assert (d["width"], d["height"]) == (W, H) and os.path.isfile(d["file_name"])
    messages = [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]
    assert messages, f"no warning naming {path}"
    for w in words:
        assert any(w in m for m in messages), (w, messages)


def test_register_all_skips_broken_json_with_message(tmp_path, caplog):
    from usdet.data.register import register_all_usdet_datasets

    (tmp_path / "ds" / "annotations").mkdir(parents=True)
    (tmp_path / "ds" / "annotations" / "train.json").write_text(json.dumps(_good_coco()))
    (tmp_path / "ds" / "annotations" / "val.json").write_text('{"images": [')  # a half-written file
    with caplog.at_level(logging.WARNING):
        names = register_all_usdet_datasets(str(tmp_path))
    assert names == ["ds_train"]
    text = caplog.text
    assert "ds_val" in text and str(tmp_path / "ds" / "annotations" / "val.json") in text and "not valid JSON" in text


def test_train_loader_on_repaired_dataset(coco_root):
    """The trainer's loader yields the repaired boxes (clipped inside the image, bad ones gone)."""
    from usdet.data.register import register_usdet_dataset
    from usdet.engine import Trainer, build_config

    doc = _good_coco()
    doc["annotations"][0]["bbox"] = [-5, -4, 20, 10]
    doc["annotations"].append({"id": 3, "image_id": 3, "category_id": 9, "bbox": [1, 1, 5, 5]})
    path = coco_root / "train_mixed.json"
    path.write_text(json.dumps(doc))
    register_usdet_dataset("bad_inputs_train_mixed", str(path), str(coco_root))
    cfg = build_config(QUICK_CFG, ["DATASETS.TRAIN", "('bad_inputs_train_mixed',)", "MODEL.DEVICE", "cpu",
                                   "INPUT.MIN_SIZE_TRAIN", f"({H},)", "INPUT.MAX_SIZE_TRAIN", str(W),
                                   "INPUT.RANDOM_FLIP", "none", "DATALOADER.FILTER_EMPTY_ANNOTATIONS", "True",
                                   "SOLVER.IMS_PER_BATCH", "2"])
    batch = next(iter(Trainer.build_train_loader(cfg)))
    boxes = {}
    for d in batch:
        b = d["instances"].gt_boxes.tensor.numpy()
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= W).all() and (b[:, 3] <= H).all()
        boxes[d["image_id"]] = sorted(b.round(3).tolist())
    # image 3's only annotation had an unknown category: dropped, and the image filtered as empty
    assert boxes == {1: [[0.0, 0.0, 15.0, 6.0]], 2: [[5.0, 5.0, 15.0, 15.0]]}


def _train_net(argv):
    train_net = load_tool("train_net")
    return train_net.cli(argv)


def test_train_net_config_with_unknown_key(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f'_BASE_: "{QUICK_CFG}"\nSOLVER:\n  NOT_A_KEY: 1\n')
    with pytest.raises(SystemExit) as e:
        _train_net(["--config-file", str(cfg), "OUTPUT_DIR", str(tmp_path / "o")])
    msg = str(e.value.code)
    assert str(cfg) in msg and "SOLVER.NOT_A_KEY" in msg
    with pytest.raises(SystemExit) as e:
        _train_net(["--config-file", QUICK_CFG, "OUTPUT_DIR", str(tmp_path / "o"), "MODEL.NOPE", "1"])
    assert "MODEL.NOPE" in str(e.value.code)


def test_train_net_dataset_not_registered(tmp_path):
    with pytest.raises(SystemExit) as e:
        _train_net(["--config-file", QUICK_CFG, "OUTPUT_DIR", str(tmp_path / "o"), "MODEL.DEVICE", "cpu",
                    "DATASETS.TRAIN", "('no_such_dataset_train',)", "DATASETS.TEST", "()"])
    msg = str(e.value.code)
    assert "no_such_dataset_train" in msg and "not registered" in msg and "USDET_DATASETS" in msg


# ----------------------------------------------------------------------------------------------
# evaluate_json: broken predictions and ground truth; the valid rest is scored as if alone
# ----------------------------------------------------------------------------------------------
def _eval_gt():
    rng = np.random.default_rng(7)
    images = [{"id": i, "file_name": f"{i}.png", "width": 100, "height": 80} for i in range(1, 21)]
    anns = []
    for i in range(1, 15):
        x, y = rng.uniform(5, 50, 2).round(1)
        anns.append({"id": i, "image_id": i, "category_id": 1 + (i % 2), "bbox": [x, y, 30.0, 20.0],
                     "area": 600.0, "iscrowd": 0})
    return {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "benign"}, {"id": 2, "name": "malignant"}]}


def _eval_preds(gt):
    rng = np.random.default_rng(8)
    preds = []
    for a in gt["annotations"]:
        j = rng.normal(0, 3, 4).round(1)
        preds.append({"image_id": a["image_id"], "category_id": a["category_id"],
                      "bbox": [a["bbox"][0] + j[0], a["bbox"][1] + j[1], 30 + j[2], 20 + j[3]],
                      "score": round(float(rng.uniform(0.4, 0.95)), 3)})
    for i in range(1, 21):
        preds.append({"image_id": i, "category_id": 1, "bbox": [60.0, 50.0, 15.0, 12.0],
                      "score": round(float(rng.uniform(0.05, 0.6)), 3)})
    return preds


BAD_PREDS = {
    "unknown_image_id": ({"image_id": 999, "category_id": 1, "bbox": [1, 1, 5, 5], "score": 0.9}, "unknown image_id"),
    "unknown_category": ({"image_id": 1, "category_id": 5, "bbox": [1, 1, 5, 5], "score": 0.9}, "unknown category_id"),
    "nan_bbox": ({"image_id": 1, "category_id": 1, "bbox": [1, float("nan"), 5, 5], "score": 0.9}, "finite"),
    "negative_width": ({"image_id": 1, "category_id": 1, "bbox": [1, 1, -5, 5], "score": 0.9}, "negative width"),
    "missing_score": ({"image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}, "missing key"),
    "short_bbox": ({"image_id": 1, "category_id": 1, "bbox": [1, 1, 5], "score": 0.9}, "bbox"),
    "not_an_object": ("oops", "not objects"),
}


def _evaluate(tmp_path, name, gt, preds, bootstrap="0"):
    evaluate_json = load_tool("evaluate_json")
    gt_path, pred_path = tmp_path / f"{name}_gt.json", tmp_path / f"{name}_pred.json"
    gt_path.write_text(gt if isinstance(gt, str) else json.dumps(gt))
    pred_path.write_text(preds if isinstance(preds, str) else json.dumps(preds))
    out = tmp_path / f"{name}_out"
    rc = evaluate_json.main(["--gt", str(gt_path), "--pred", str(pred_path), "--output", str(out),
                             "--bootstrap", bootstrap, "--no-plots"])
    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else None
    return rc, metrics, pred_path, gt_path


@pytest.fixture(scope="module")
def clean_eval(tmp_path_factory):
    gt = _eval_gt()
    rc, metrics, _, _ = _evaluate(tmp_path_factory.mktemp("eval_clean"), "clean", gt, _eval_preds(gt))
    assert rc == 0 and not metrics["warnings"]
    return metrics


def _same_scores(a, b):
    for path in (("bbox", "AP50"), ("bbox", "AP"), ("piou", "score"), ("froc", "cpm"), ("image_level", "auc")):
        x, y = a[path[0]][path[1]], b[path[0]][path[1]]
        assert (x is None and y is None) or x == pytest.approx(y, abs=1e-9), (path, x, y)


@pytest.mark.parametrize("case", sorted(BAD_PREDS))
def test_evaluate_json_bad_predictions(tmp_path, clean_eval, case):
    gt = _eval_gt()
    entry, words = BAD_PREDS[case]
    preds = _eval_preds(gt)
    preds.insert(3, entry)
    rc, metrics, pred_path, _ = _evaluate(tmp_path, case, gt, json.dumps(preds))
    assert rc == 0
    ws = [w for w in metrics["warnings"] if str(pred_path) in w]
    assert ws and any(words in w for w in ws), metrics["warnings"]
    _same_scores(metrics, clean_eval)  # the valid detections are scored exactly as without the bad one


GT_PROBLEMS = {
    "duplicate_image_id": (lambda d: d["images"].append(dict(d["images"][0])), "duplicate image id"),
    "unknown_category": (lambda d: d["annotations"].append(
        {"id": 99, "image_id": 20, "category_id": 9, "bbox": [1, 1, 5, 5]}), "unknown category_id"),
    "box_outside_image": (lambda d: d["annotations"][0].update(bbox=[90.0, 70.0, 30.0, 20.0]), "outside the image"),
    "annotation_missing_bbox": (lambda d: d["annotations"].append({"id": 98, "image_id": 20, "category_id": 1}),
                                "missing"),
}


@pytest.mark.parametrize("case", sorted(GT_PROBLEMS))
def test_evaluate_json_bad_ground_truth(tmp_path, case):
    gt = _eval_gt()
    edit, words = GT_PROBLEMS[case]
    dirty = copy.deepcopy(gt)
    edit(dirty)
    rc, metrics, _, gt_path = _evaluate(tmp_path, case, dirty, _eval_preds(gt))
    assert rc == 0
    assert any(str(gt_path) in w and words in w for w in metrics["warnings"]), metrics["warnings"]
    if case != "box_outside_image":  # dropped entries: scores equal the clean set's
        preds = _eval_preds(gt)
        if case == "duplicate_image_id":  # both entries of id 1 are dropped (as at registration)
            gt = dict(gt, images=gt["images"][1:], annotations=[a for a in gt["annotations"] if a["image_id"] != 1])
            preds = [p for p in preds if p["image_id"] != 1]
        _, clean, _, _ = _evaluate(tmp_path, case + "_clean", gt, preds)
        _same_scores(metrics, clean)


@pytest.mark.parametrize("which,text,words", [
    ("pred", "{not json", "not valid JSON"),
    ("pred", '{"image_id": 1}', "expected a list"),
    ("gt", "[1, 2]", "expected a COCO object"),
    ("gt", '{"images": [{"id": 1}], "annotations": []}', "missing top-level key 'categories'"),
    ("gt", "", "not valid JSON"),
])
def test_evaluate_json_unusable_file(tmp_path, capsys, which, text, words):
    gt = _eval_gt()
    rc, metrics, pred_path, gt_path = _evaluate(tmp_path, "x", text if which == "gt" else gt,
                                                text if which == "pred" else _eval_preds(gt))
    err = capsys.readouterr().err
    assert rc == 2 and metrics is None
    assert str(pred_path if which == "pred" else gt_path) in err and words in err


# ----------------------------------------------------------------------------------------------
# the hospital converter's COCO-JSON input (CVAT / Label Studio exports) with broken entries
# ----------------------------------------------------------------------------------------------
def _frames_coco(screens):
    """COCO JSON in full-frame pixels for the good screens: one box each, 8 px inside the image."""
    images, anns = [], []
    for i, (name, s) in enumerate(sorted(screens.items()), start=1):
        images.append({"id": i, "file_name": name, "width": s.frame.shape[1], "height": s.frame.shape[0],
                       "patient_id": f"P{i}"})
        anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [s.box[0] + 8, s.box[1] + 8, 20, 14]})
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "lesion"}]}


FRAMES_COCO_CASES = {
    "unknown_category": (lambda d: d["annotations"].append(
        {"id": 9, "image_id": 1, "category_id": 5, "bbox": [50, 50, 10, 10]}), "annotation 9"),
    "unknown_image_id": (lambda d: d["annotations"].append(
        {"id": 9, "image_id": 77, "category_id": 1, "bbox": [50, 50, 10, 10]}), "unknown image_id"),
    "missing_bbox": (lambda d: d["annotations"].append({"id": 9, "image_id": 1, "category_id": 1}), "annotation 9"),
    "nan_bbox": (lambda d: d["annotations"].append(
        {"id": 9, "image_id": 1, "category_id": 1, "bbox": [50, float("nan"), 10, 10]}), "annotation 9"),
    "negative_size": (lambda d: d["annotations"].append(
        {"id": 9, "image_id": 1, "category_id": 1, "bbox": [50, 50, -10, 10]}), "annotation 9"),
    "duplicate_image_id": (lambda d: d["images"].append(dict(d["images"][0], file_name="case_g.png")), "image id"),
}

@pytest.mark.parametrize("case", sorted(FRAMES_COCO_CASES))
def test_frames_converter_coco_input(frames_dir, tmp_path, case):
    from usdet.data.frames import convert_frames

    edit, words = FRAMES_COCO_CASES[case]
    doc = _frames_coco(frames_dir["screens"])
    edit(doc)
    ann = tmp_path / "export.json"
    ann.write_text(json.dumps(doc))
    out = tmp_path / "out"
    report = convert_frames(str(frames_dir["dir"]), str(ann), str(out), KEY.encode(), progress=False)
    boxes = []
    for split in ("train", "val", "test"):
        d = json.loads((out / "annotations" / f"{split}.json").read_text())
        boxes += [a["bbox"] for a in d["annotations"]]
    assert any(words in p for p in report["annotation_problems"]), report["annotation_problems"]
    # the two valid boxes are kept exactly (shifted into their crops), nothing else
    assert len(boxes) == 2 and all(b[2:] == [20, 14] and None not in b for b in boxes), boxes
    if case == "duplicate_image_id":  # the repeated entry is listed, pseudonymized, with its reason
        assert any("repeats an earlier image entry" in f["reason"] for f in report["failed"]), report["failed"]
        assert "case_g" not in json.dumps(report)


def test_train_net_dataset_with_no_usable_image(coco_root, tmp_path):
    """A registered dataset whose JSON turns out unusable when loaded: one clear line, non-zero exit."""
    from usdet.data.register import DatasetFormatError, register_usdet_dataset

    doc = _good_coco()
    for im in doc["images"]:
        im.pop("file_name")
    path = coco_root / "no_usable_train.json"
    path.write_text(json.dumps(doc))
    register_usdet_dataset("bad_inputs_no_usable_train", str(path), str(coco_root))
    argv = ["--config-file", QUICK_CFG, "OUTPUT_DIR", str(tmp_path / "o"), "MODEL.DEVICE", "cpu",
            "DATASETS.TRAIN", "('bad_inputs_no_usable_train',)", "DATASETS.TEST", "()"]
    try:
        _train_net(argv)
    except SystemExit as e:
        msg = str(e.code)
        assert str(path) in msg and "no usable image" in msg
        return
    except DatasetFormatError as e:
        pytest.fail(f"tools/train_net.py let DatasetFormatError escape as a traceback: {e}")
    pytest.fail("train_net accepted a dataset with no usable image")


def test_cropper_refuses_dim_lossy_sectors():
    """Dim JPEG sector screens whose edges sink into the compression noise are refused, not cropped wrongly
    (frames 9 and 40 of this sequence were cropped with IoU 0.47 and 0.32); the others still crop well."""
    from usdet.data.crop import find_image_region
    from usdet.data.screens import make_screen

    rng = np.random.default_rng(0)
    screens = [make_screen(rng, canvas=(1024, 768)) for _ in range(60)]
    results = [find_image_region(s.frame) for s in screens]
    for i in (9, 40):
        assert screens[i].info["jpeg_quality"] and screens[i].info["gain"] < 0.35, screens[i].info
        assert results[i].box is None and "compression noise" in results[i].reason, results[i]
    ious = [_iou(r.box, s.box) for r, s in zip(results, screens) if r.box is not None]
    assert min(ious) >= 0.95, sorted(ious)[:3]  # no wrong crop
    assert len(ious) >= 0.9 * len(screens), len(ious)
