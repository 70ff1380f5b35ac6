"""Exported models (TorchScript, ONNX through onnxruntime) give the eager model's detections.

A phantom detector trained once per session (train_helpers) is exported with tools/export_model.py
and run through tools/predict.py with each backend on phantom scanner screens (crop -> resize ->
detect -> map back) and, when present, BUSI images: same count of detections with score >= 0.05,
each within 0.5 px and 1e-3 in score of its eager twin (matched by IoU).
"""
import json
import os

import numpy as np
import pytest
import torch

from train_helpers import QUICK_CFG, load_tool, train_phantom_detector

SCORE = 0.05
BOX_TOL, SCORE_TOL = 0.5, 1e-3


@pytest.fixture(scope="session")
def phantom_detector(tmp_path_factory):
    """Weights of the quick R18-FPN trained ~150 steps on phantoms (confident detections)."""
    _, model = train_phantom_detector(150, 128, seed=0)
    weights = str(tmp_path_factory.mktemp("export_model") / "model.pth")
    torch.save({"model": model.state_dict()}, weights)
    return weights


@pytest.fixture(scope="session")
def exported(phantom_detector, tmp_path_factory):
    """tools/export_model.py in both formats: {format: output folder}."""
    tool = load_tool("export_model")
    out = {}
    for fmt in ("torchscript", "onnx"):
        d = tmp_path_factory.mktemp(f"export_{fmt}")
        rc = tool.main(["--config-file", QUICK_CFG, "--weights", phantom_detector, "--format", fmt,
                        "--output", str(d)])
        assert rc == 0
        out[fmt] = d
    return out


@pytest.fixture(scope="module")
def screens(tmp_path_factory):
    """Phantom lesions inside drawn scanner screens of several sizes, plus two cropped phantoms."""
    from usdet.data.phantom import render_phantom
    from usdet.data.screens import make_screen
    from usdet.utils.io import atomic_write_image

    d = tmp_path_factory.mktemp("export_frames")
    rng = np.random.default_rng(11)
    for i, (size, canvas) in enumerate([((120, 150), (360, 280)), ((140, 120), (320, 300)),
                                        ((110, 170), (400, 260)), ((128, 128), (300, 300))]):
        img, _, _ = render_phantom(rng, size, kinds=["benign" if i % 2 else "malignant"])
        frame = make_screen(rng, img, probe="linear", theme="dark", canvas=canvas, gain=1.0, doppler=False).frame
        atomic_write_image(str(d / f"screen_{i}.png"), frame)
    for i, size in enumerate([(128, 160), (150, 120)]):
        img, _, _ = render_phantom(rng, size, kinds=["benign"])
        atomic_write_image(str(d / f"cropped_{i}.png"), img)
    return d


def _predict(tmp_path, backend, weights, inputs):
    out = tmp_path / backend
    argv = ["--backend", backend, "--weights", str(weights), "--input", *map(str, inputs), "--output", str(out),
            "--score-thresh", str(SCORE), "--no-progress"]
    if backend == "torch":
        argv += ["--config-file", QUICK_CFG]
    assert load_tool("predict").main(argv) == 0
    records = json.loads((out / "predictions.json").read_text())
    return {(r["source"], r["frame"]): r for r in records}, json.loads((out / "report.json").read_text())


def _iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _assert_same_detections(eager, other, backend):
    """Same frames, crop boxes, counts; each eager box matched by IoU to one within tolerance."""
    assert set(other) == set(eager)
    worst_box = worst_score = 0.0
    n = 0
    for key, rec in eager.items():
        got = other[key]
        assert got["crop_box"] == rec["crop_box"]
        assert len(got["boxes"]) == len(rec["boxes"]), (backend, key, got["boxes"], rec["boxes"])
        free = list(range(len(got["boxes"])))
        for b in rec["boxes"]:
            j = max(free, key=lambda k: _iou(b["bbox_xyxy_original"], got["boxes"][k]["bbox_xyxy_original"]))
            free.remove(j)
            g = got["boxes"][j]
            assert g["class"] == b["class"]
            worst_box = max(worst_box, float(np.abs(np.subtract(g["bbox_xyxy_original"], b["bbox_xyxy_original"])).max()))
            worst_score = max(worst_score, abs(g["score"] - b["score"]))
            n += 1
    print(f"{backend}: {n} detections, max box diff {worst_box:.3g} px, max score diff {worst_score:.2g}")
    assert worst_box <= BOX_TOL and worst_score <= SCORE_TOL
    return n


def test_exports_write_model_and_description(exported, phantom_detector):
    for fmt, name in (("torchscript", "model.ts"), ("onnx", "model.onnx")):
        meta = json.loads((exported[fmt] / "model.json").read_text())
        assert (exported[fmt] / name).stat().st_size > 1_000_000
        assert meta["format"] == fmt and meta["file"] == name
        assert meta["class_names"] == ["lesion"]
        assert meta["input"]["format"] == "BGR" and meta["input"]["dtype"] == "uint8"
        assert meta["input"]["resize"] == {"rule": "ResizeShortestEdge", "short_edge": 128, "max_size": 160,
                                           "interp": "bilinear (PIL)"}
        assert meta["weights"] == phantom_detector and meta["weights_used"] == "model"
        if fmt == "torchscript" or meta["check"]["ok"] is not None:
            assert meta["check"]["ok"] is True and meta["check"]["detections"] > 0


def test_exported_models_match_eager_on_phantom_screens(phantom_detector, exported, screens, tmp_path):
    inputs = sorted(screens.iterdir())
    eager, report = _predict(tmp_path, "torch", phantom_detector, inputs)
    assert report["backend"] == "torch" and report["num_frames"] == len(inputs)
    assert sum(len(r["boxes"]) for r in eager.values()) >= len(inputs), "the trained model should detect lesions"
    assert any(r["crop_box"][:2] != [0, 0] for r in eager.values()), "screens are cropped before detection"
    ts, ts_report = _predict(tmp_path, "torchscript", exported["torchscript"] / "model.ts", inputs)
    assert ts_report["backend"] == "torchscript" and ts_report["weights_used"] == "model"
    _assert_same_detections(eager, ts, "torchscript")
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)")
    ort, _ = _predict(tmp_path, "onnxruntime", exported["onnx"] / "model.onnx", inputs)
    _assert_same_detections(eager, ort, "onnxruntime")


def test_exported_models_match_eager_on_busi(phantom_detector, exported, busi_root, tmp_path):
    """Six BUSI images (benign 1-3, malignant 1-2, normal 1), cropped and resized as any frame."""
    inputs = [os.path.join(busi_root, cls, f"{cls} ({i}).png")
              for cls, ids in (("benign", (1, 2, 3)), ("malignant", (1, 2)), ("normal", (1,))) for i in ids]
    eager, _ = _predict(tmp_path, "torch", phantom_detector, inputs)
    assert len(eager) == len(inputs)
    ts, _ = _predict(tmp_path, "torchscript", exported["torchscript"] / "model.ts", inputs)
    _assert_same_detections(eager, ts, "torchscript")
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)")
    ort, _ = _predict(tmp_path, "onnxruntime", exported["onnx"] / "model.onnx", inputs)
    _assert_same_detections(eager, ort, "onnxruntime")


def test_export_refuses_tta_and_missing_weights(phantom_detector, tmp_path, capsys):
    tool = load_tool("export_model")
    rc = tool.main(["--config-file", QUICK_CFG, "--weights", phantom_detector, "--format", "onnx",
                    "--output", str(tmp_path / "tta"), "TEST.FLIP", "True"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "cannot export" in err and "test-time augmentation" in err and "TEST.FLIP False" in err
    assert not (tmp_path / "tta").exists()
    rc = tool.main(["--config-file", QUICK_CFG, "--weights", str(tmp_path / "none.pth"), "--format", "torchscript",
                    "--output", str(tmp_path / "none")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and str(tmp_path / "none.pth") in err and "not found" in err


def _predict_clip(tmp_path, backend, weights, clip, extra=()):
    out = tmp_path / f"clip_{backend}"
    argv = ["--backend", backend, "--weights", str(weights), "--clip", "--input", str(clip), "--output", str(out),
            "--score-thresh", "0.3", "--no-progress", *extra]
    if backend == "torch":
        argv += ["--config-file", QUICK_CFG]
    rc = load_tool("predict").main(argv)
    if rc:
        return rc, None, None
    report = json.loads((out / "report.json").read_text())
    tracks = json.loads((out / "clip_000" / "tracks.json").read_text())
    return rc, report, tracks


def test_exported_models_run_clips_with_the_clip_rule(phantom_detector, exported, tmp_path):
    """An exported model runs --clip like the eager one, and CLIP.* overrides (the clip rule, which
    runs outside the model) reach it; a model key is refused (it is baked into the export)."""
    from usdet.data.cine import SyntheticCine, write_cine_frames

    clip = tmp_path / "sweep"
    write_cine_frames(SyntheticCine(seed=5, num_frames=30, size=(128, 160)), str(clip))
    rule = ["CLIP.WINDOW", "5", "CLIP.MIN_HITS", "2", "CLIP.SCORE_THRESH", "0.25"]
    rc, eager_report, eager = _predict_clip(tmp_path, "torch", phantom_detector, clip, rule)
    assert rc == 0
    rc, ts_report, ts = _predict_clip(tmp_path, "torchscript", exported["torchscript"] / "model.ts", clip, rule)
    assert rc == 0
    for report in (eager_report, ts_report):
        assert report["temporal_rule"]["window"] == 5 and report["temporal_rule"]["min_hits"] == 2
        assert report["temporal_rule"]["score_thresh"] == 0.25
    assert eager["tracks"], "the trained model should track the phantom's lesions"
    assert [t["frames_seen"] for t in ts["tracks"]] == [t["frames_seen"] for t in eager["tracks"]]
    assert [t["reported"] for t in ts["tracks"]] == [t["reported"] for t in eager["tracks"]]
    for a, b in zip(ts["tracks"], eager["tracks"]):
        assert np.allclose(a["peak_box"], b["peak_box"], atol=BOX_TOL)
    rc, _, _ = _predict_clip(tmp_path, "torchscript", exported["torchscript"] / "model.ts", clip,
                             ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.2"])
    assert rc == 2
