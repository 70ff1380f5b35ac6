"""Prediction on new frames: exact box mapping, batching = DefaultPredictor, images + multi-frame
DICOM + bad inputs through tools/predict.py."""
import json
import os

import numpy as np
import pytest
import torch

from usdet.data.crop import boxes_to_source as map_boxes_to_original
from usdet.data.dicom import write_ultrasound_dicom
from usdet.engine.predictor import BatchPredictor, build_predictor_cfg
from train_helpers import QUICK_CFG, load_tool

ALL_BOXES = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]  # an untrained model: keep every box


def test_map_boxes_to_original_is_an_exact_shift():
    boxes = np.array([[0.0, 0.0, 10.0, 20.0], [5.5, 6.25, 7.75, 100.0]])
    out = map_boxes_to_original(boxes, (37, 12, 300, 400))
    np.testing.assert_array_equal(out, [[37.0, 12.0, 47.0, 32.0], [42.5, 18.25, 44.75, 112.0]])
    # a box touching the crop's exclusive right/bottom edge lands on the source's exclusive edge
    np.testing.assert_array_equal(map_boxes_to_original([[0, 0, 263, 388]], (37, 12, 300, 400)),
                                  [[37, 12, 300, 400]])
    np.testing.assert_array_equal(map_boxes_to_original(boxes, None), boxes)
    assert map_boxes_to_original(np.zeros((0, 4)), (1, 2, 3, 4)).shape == (0, 4)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """Config file + randomly initialized weights of the quick R18-FPN (structure, not accuracy)."""
    from detectron2.modeling import build_model

    d = tmp_path_factory.mktemp("tiny_model")
    cfg = build_predictor_cfg(QUICK_CFG, "", "cpu", ALL_BOXES)
    torch.manual_seed(0)
    model = build_model(cfg)
    weights = str(d / "model.pth")
    torch.save({"model": model.state_dict()}, weights)
    return QUICK_CFG, weights


def test_batch_predictor_matches_default_predictor(tiny_model):
    from detectron2.engine import DefaultPredictor

    cfg = build_predictor_cfg(tiny_model[0], tiny_model[1], "cpu", ALL_BOXES)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (100, 140, 3), dtype=np.uint8) for _ in range(3)]
    batched = BatchPredictor(cfg, batch_size=3)(images)
    single = DefaultPredictor(cfg)
    for img, got in zip(images, batched):
        ref = single(img[:, :, ::-1])["instances"].to("cpu")  # DefaultPredictor takes BGR
        assert len(got) == len(ref) > 0
        np.testing.assert_allclose(got.pred_boxes.tensor.numpy(), ref.pred_boxes.tensor.numpy(), atol=1e-3)
        np.testing.assert_allclose(got.scores.numpy(), ref.scores.numpy(), atol=1e-4)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Scanner screens around phantoms (PNG + 3-frame DICOM), a cropped phantom, and a corrupt file."""
    from usdet.data.phantom import render_phantom
    from usdet.data.screens import make_screen
    from usdet.utils.io import atomic_write_image

    d = tmp_path_factory.mktemp("predict_inputs")
    rng = np.random.default_rng(3)
    screens = []
    for _ in range(4):
        img, _, _ = render_phantom(rng, (120, 150), kinds=["benign"])
        screens.append(make_screen(rng, img, probe="linear", theme="dark", canvas=(360, 280), gain=1.0,
                                   doppler=False).frame)
    atomic_write_image(str(d / "frames" / "screen.png"), screens[0])
    cropped, _, _ = render_phantom(rng, (110, 130), kinds=["malignant"])
    atomic_write_image(str(d / "frames" / "already_cropped.png"), cropped)
    write_ultrasound_dicom(str(d / "clip.dcm"), np.stack(screens[1:]), "RGB", frames=3, PatientName="Doe^Jane",
                           PatientID="MRN-0042")
    (d / "frames" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return d


def _run_tool(argv):
    predict = load_tool("predict")
    return predict.main(argv)


def test_predict_tool_images_dicom_and_bad_inputs(tiny_model, inputs, tmp_path, capsys):
    from usdet.data.crop import find_image_region
    from usdet.data.sources import iter_source_frames

    out = tmp_path / "out"
    missing = str(inputs / "no_such_frame.png")
    rc = _run_tool(["--config-file", tiny_model[0], "--weights", tiny_model[1],
                    "--input", str(inputs / "frames"), str(inputs / "clip.dcm"), missing,
                    "--output", str(out), "--score-thresh", "0.2", "--batch-size", "3", "--device", "cpu",
                    "--overlays", "--no-progress", *ALL_BOXES])
    assert rc == 0
    records = json.loads((out / "predictions.json").read_text())
    report = json.loads((out / "report.json").read_text())

    # every good frame once, bad inputs listed with their reasons (and printed), not in the records
    keys = sorted((os.path.basename(r["source"]), r["frame"] if r["frame"] is not None else -1) for r in records)
    assert keys == [("already_cropped.png", -1), ("clip.dcm", 0), ("clip.dcm", 1), ("clip.dcm", 2),
                    ("screen.png", -1)]
    failed = {os.path.basename(f["source"]): f["reason"] for f in report["failures"]}
    assert set(failed) == {"broken.png", "no_such_frame.png"}
    assert "corrupt" in failed["broken.png"] or "not an image" in failed["broken.png"]
    assert "cannot open" in failed["no_such_frame.png"]
    err = capsys.readouterr().err
    assert "broken.png" in err and "no_such_frame.png" in err
    assert report["num_frames"] == 5 and report["num_sources"] == 5

    # no patient identifier from the DICOM header reaches the outputs
    text = (out / "predictions.json").read_text() + (out / "report.json").read_text()
    assert "Doe" not in text and "MRN-0042" not in text

    # recompute each frame: crop box = the cropper's, boxes = model on the crop shifted by (x0, y0)
    cfg = build_predictor_cfg(tiny_model[0], tiny_model[1], "cpu", ALL_BOXES)
    pred = BatchPredictor(cfg, batch_size=1)
    frames = {}
    for src in (inputs / "frames" / "screen.png", inputs / "frames" / "already_cropped.png", inputs / "clip.dcm"):
        for idx, fr in iter_source_frames(str(src)):
            frames[(src.name, idx)] = fr
    n_boxes = 0
    for r in records:
        frame = frames[(os.path.basename(r["source"]), r["frame"])]
        h, w = frame.shape[:2]
        crop = find_image_region(frame)
        expected_box = list(crop.box) if crop.box is not None else [0, 0, w, h]
        assert r["crop_box"] == expected_box
        x0, y0, x1, y1 = r["crop_box"]
        if os.path.basename(r["source"]) != "already_cropped.png":
            assert (x1 - x0) * (y1 - y0) < 0.6 * h * w, "the GUI around the image should be cropped away"
        inst = pred([np.ascontiguousarray(frame[y0:y1, x0:x1])])[0]
        keep = inst.scores.numpy() >= 0.2
        order = np.argsort(-inst.scores.numpy()[keep], kind="stable")
        want = inst.pred_boxes.tensor.numpy()[keep][order] + np.array([x0, y0, x0, y0])
        got = np.array([b["bbox_xyxy_original"] for b in r["boxes"]]).reshape(-1, 4)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=0.006)  # JSON keeps 2 decimals
        assert all(b["score"] >= 0.2 and b["class"] == "lesion" for b in r["boxes"])
        assert [b["score"] for b in r["boxes"]] == sorted((b["score"] for b in r["boxes"]), reverse=True)
        if len(got):
            assert (got[:, 0] >= x0 - 1e-3).all() and (got[:, 2] <= x1 + 1e-3).all()
            assert (got[:, 1] >= y0 - 1e-3).all() and (got[:, 3] <= y1 + 1e-3).all()
        n_boxes += len(got)
        if r.get("crop_note"):
            assert r["overlay"] is None and "withheld" in r["overlay_note"]
        else:
            assert (out / r["overlay"]).is_file()
    assert n_boxes > 0 and n_boxes == report["num_boxes"]

    # the overlay of the full scanner frame hides the workspace (burned-in name, ID, date)
    from usdet.data.image_io import read_image
    from usdet.visualization.overlay import overlay_scale

    (screen,) = [r for r in records if r["source"].endswith("screen.png")]
    ov = read_image(str(out / screen["overlay"]))
    fh, fw = frames[("screen.png", None)].shape[:2]
    s = overlay_scale(fh, fw)
    assert ov.shape[:2] == (int(round(fh * s)), int(round(fw * s)))
    x0, y0 = screen["crop_box"][:2]
    assert y0 > 8 and x0 > 8
    corner = ov[: int(y0 * s) - 6, : int(x0 * s) - 6]
    assert corner.size and corner.max() == 0, "workspace outside the crop must be blacked out"


def test_predict_tool_no_crop_and_nothing_processed(tiny_model, inputs, tmp_path):
    out = tmp_path / "nocrop"
    rc = _run_tool(["--config-file", tiny_model[0], "--weights", tiny_model[1], "--input",
                    str(inputs / "frames" / "screen.png"), "--output", str(out), "--no-crop", "--no-progress"])
    assert rc == 0
    (rec,) = json.loads((out / "predictions.json").read_text())
    assert rec["crop_box"] == [0, 0, 360, 280] and rec["frame"] is None

    out2 = tmp_path / "none"
    rc = _run_tool(["--config-file", tiny_model[0], "--weights", tiny_model[1], "--input",
                    str(inputs / "frames" / "broken.png"), "--output", str(out2), "--no-progress"])
    assert rc == 1
    assert json.loads((out2 / "predictions.json").read_text()) == []
    assert len(json.loads((out2 / "report.json").read_text())["failures"]) == 1


def test_batch_of_mixed_sizes_matches_default_predictor_per_image(tiny_model):
    """Frames of different sizes in one batch: each gets DefaultPredictor's boxes for it alone
    (padding a frame up to a larger one in its batch would change its features and anchors)."""
    from detectron2.engine import DefaultPredictor

    cfg = build_predictor_cfg(tiny_model[0], tiny_model[1], "cpu", ALL_BOXES)
    rng = np.random.default_rng(2)
    sizes = [(100, 140), (90, 210), (128, 128), (61, 150), (100, 143)]  # 128x179, 128x299, 128x128, ...
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    batched = BatchPredictor(cfg, batch_size=len(images))(images)
    single = DefaultPredictor(cfg)
    for img, got in zip(images, batched):
        ref = single(img[:, :, ::-1])["instances"].to("cpu")
        assert got.image_size == img.shape[:2]
        assert len(got) == len(ref) > 0
        np.testing.assert_allclose(got.pred_boxes.tensor.numpy(), ref.pred_boxes.tensor.numpy(), atol=1e-3)
        np.testing.assert_allclose(got.scores.numpy(), ref.scores.numpy(), atol=1e-4)


def test_missing_or_unreadable_weights_end_with_one_line(tiny_model, inputs, tmp_path, capsys, monkeypatch):
    # Earlier in-process tool runs of this session leave logging handlers on streams pytest has
    # since closed; their "--- Logging error ---" reports are test-harness noise, not tool output.
    import logging

    monkeypatch.setattr(logging, "raiseExceptions", False)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    onnx_dir = tmp_path / "exp"
    onnx_dir.mkdir()
    (onnx_dir / "model.onnx").write_bytes(b"not onnx")
    (onnx_dir / "model.json").write_text(json.dumps({"format": "onnx"}))
    cases = [
        (["--backend", "torch", "--config-file", tiny_model[0], "--weights", str(tmp_path / "nope.pth")],
         [str(tmp_path / "nope.pth"), "not found"]),
        (["--config-file", tiny_model[0], "--weights", str(garbage)], [str(garbage), "not a readable checkpoint"]),
        (["--backend", "onnxruntime", "--weights", str(tmp_path / "nope.onnx")],
         [str(tmp_path / "nope.onnx"), "not found"]),
        (["--backend", "onnxruntime", "--weights", str(onnx_dir / "model.onnx")],
         [str(onnx_dir / "model.onnx"), "not a readable onnx model"]),
        (["--backend", "torchscript", "--weights", str(onnx_dir / "model.onnx")], ["onnx export", "--backend onnxruntime"]),
    ]
    try:
        import onnxruntime  # noqa: F401
    except ImportError:  # the one case that depends on it: then the message says to install it
        cases[3] = (cases[3][0], ["--backend onnxruntime needs the onnxruntime package"])
    for argv, words in cases:
        rc = _run_tool([*argv, "--input", str(inputs / "frames" / "screen.png"), "--output", str(tmp_path / "o"),
                        "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert rc == 2, argv
        assert len(err.splitlines()) == 1 and err.startswith("predict: error: "), err
        assert all(w in err for w in words), (words, err)
    assert not (tmp_path / "o" / "predictions.json").exists()


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """A real 3-iteration training with MODEL.EMA on phantoms: its final checkpoint carries both
    the training weights and the EMA weights, in the trainer's own format."""
    from train_helpers import make_datasets_root, quick_cfg
    from usdet.engine import Trainer

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = make_datasets_root(str(tmp_path_factory.mktemp("ema_datasets")))
        out = tmp_path_factory.mktemp("ema_run")
        cfg = quick_cfg(out, "SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "3", "TEST.EVAL_PERIOD", "0",
                        "MODEL.EMA.ENABLED", "True", "MODEL.EMA.DECAY", "0.9",
                        "SOLVER.BEST_CHECKPOINT.ENABLED", "False")
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
    finally:
        torch.set_num_threads(before)
    return root, out, str(out / "model_final.pth")


def test_predict_uses_what_eval_only_uses_ema_and_flip(ema_run, tmp_path):
    """tools/predict.py on the validation images gives --eval-only's detections exactly: the EMA
    weights of the checkpoint, and detectron2's flip TTA when TEST.FLIP is on; report says which."""
    from detectron2.data import DatasetCatalog

    from train_helpers import quick_cfg
    from usdet.engine import evaluate_checkpoint
    from usdet.engine.predictor import ema_weights

    _, run_dir, weights = ema_run
    ckpt = torch.load(weights, map_location="cpu", weights_only=False)
    ema, raw = ema_weights(ckpt), ckpt["model"]
    assert ema is not None and any(not torch.equal(ema[k], raw[k]) for k in raw if raw[k].is_floating_point())

    opts = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "MODEL.EMA.ENABLED", "True", "TEST.FLIP", "True",
            "MODEL.ROI_HEADS.NUM_CLASSES", "1"]
    ev = tmp_path / "eval"
    evaluate_checkpoint(quick_cfg(ev, "MODEL.WEIGHTS", weights, *opts))
    coco = json.load(open(ev / "inference" / "ph1_val" / "coco_instances_results.json"))
    dicts = DatasetCatalog.get("ph1_val")
    files = {d["image_id"]: d["file_name"] for d in dicts}
    out = tmp_path / "pred"
    run_cfg = str(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else QUICK_CFG
    rc = _run_tool(["--config-file", run_cfg, "--weights", weights, "--input", *files.values(),
                    "--output", str(out), "--no-crop", "--score-thresh", "0", "--no-progress", *opts])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["weights_used"] == "ema" and report["tta"] is True and "EMA" in report["weights_note"]
    records = {r["source"]: r for r in json.loads((out / "predictions.json").read_text())}
    n = 0
    for image_id, fname in files.items():
        want = sorted(([d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2], d["bbox"][1] + d["bbox"][3],
                        d["score"]] for d in coco if d["image_id"] == image_id), key=lambda r: -r[4])
        got = [[*b["bbox_xyxy_original"], b["score"]] for b in records[fname]["boxes"]]
        assert len(got) == len(want) > 0
        np.testing.assert_allclose(np.array(got)[:, :4], np.array(want)[:, :4], atol=0.011)
        np.testing.assert_allclose(np.array(got)[:, 4], np.array(want)[:, 4], atol=2e-4)
        n += len(got)
    assert n == report["num_boxes"]

    # the same predictor without EMA or without the flip gives other boxes (both choices matter)
    images = [read(f) for f in list(files.values())[:3]]
    base = build_predictor_cfg(QUICK_CFG, weights, "cpu", opts)
    with_both = BatchPredictor(base)(images)
    for change in (["MODEL.EMA.ENABLED", "False"], ["TEST.FLIP", "False"]):
        pred = BatchPredictor(build_predictor_cfg(QUICK_CFG, weights, "cpu", opts + change))
        assert pred.weights_used == ("model" if change[0] == "MODEL.EMA.ENABLED" else "ema")
        other = pred(images)
        if change[0] == "MODEL.EMA.ENABLED":
            assert all(torch.equal(v, raw[k]) for k, v in pred.model.state_dict().items())
        assert any(len(a) != len(b) or not torch.allclose(a.pred_boxes.tensor, b.pred_boxes.tensor, atol=1e-3)
                   for a, b in zip(with_both, other)), change

    # a model_best.pth of an EMA run holds the averaged weights as "model": used, and said so
    best = tmp_path / "model_best.pth"
    torch.save({"model": ema, "iteration": 2, "usdet_best": {"metric": "bbox/AP50", "value": 1.0, "iteration": 2}},
               best)
    pred = BatchPredictor(build_predictor_cfg(QUICK_CFG, str(best), "cpu", opts))
    assert pred.weights_used == "ema" and "model_best" in pred.weights_note
    assert all(torch.equal(v, ema[k]) for k, v in pred.model.state_dict().items())


def read(path):
    from usdet.data.image_io import read_image

    return read_image(path)
