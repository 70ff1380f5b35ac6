"""The light detector of issue 21: usdet's slim ResNet-FPN backbone, built, trained, exported."""
import json
import os

import numpy as np
import pytest
import torch

from test_export import _assert_same_detections
from train_helpers import REPO, load_tool, phantom_batches

LITE_CFG = os.path.join(REPO, "configs", "quick_schedules", "phantom_lite_slim.yaml")


def _cfg(*opts):
    from usdet.engine import build_config

    return build_config(LITE_CFG, list(opts))


def test_slim_backbone_is_registered_and_shaped_by_the_config():
    from detectron2.modeling import BACKBONE_REGISTRY, build_backbone

    import usdet.modeling  # noqa: F401  (registers it)

    assert "build_slim_resnet_fpn_backbone" in BACKBONE_REGISTRY._obj_map
    for width in (16, 32, 48):
        cfg = _cfg("MODEL.RESNETS.STEM_OUT_CHANNELS", str(width), "MODEL.RESNETS.RES2_OUT_CHANNELS", str(width))
        backbone = build_backbone(cfg)
        bottom = backbone.bottom_up
        shapes = bottom.output_shape()
        assert sorted(shapes) == ["res3", "res4", "res5"]
        assert [shapes[k].channels for k in ("res3", "res4", "res5")] == [2 * width, 4 * width, 8 * width]
        assert [shapes[k].stride for k in ("res3", "res4", "res5")] == [8, 16, 32]
        out = backbone(torch.zeros(1, 3, 128, 160))
        assert sorted(out) == ["p3", "p4", "p5", "p6"]
        assert out["p3"].shape == (1, 64, 16, 20) and out["p6"].shape == (1, 64, 2, 3)
    # half width: about a quarter of R18's backbone weights
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    slim = n(build_backbone(_cfg()).bottom_up)
    full = n(build_backbone(_cfg("MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone", "MODEL.RESNETS.STEM_OUT_CHANNELS",
                                 "64", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64")).bottom_up)
    assert 0.2 < slim / full < 0.3
    with pytest.raises(ValueError, match="DEPTH must be 18 or 34"):
        build_backbone(_cfg("MODEL.RESNETS.DEPTH", "50"))


def test_light_detector_trains_forward_and_backward():
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    storage = EventStorage(0).__enter__()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = phantom_batches(0, 128, batch_size=2)
    totals = []
    for step in range(12):
        losses = model(next(batches))
        assert set(losses) == {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"}
        total = sum(losses.values())
        assert torch.isfinite(total)
        opt.zero_grad()
        total.backward()
        stem_grad = model.backbone.bottom_up.stem.conv1.weight.grad
        assert stem_grad is not None and float(stem_grad.abs().sum()) > 0  # gradients reach the stem
        opt.step()
        totals.append(float(total))
    storage.__exit__(None, None, None)
    assert np.mean(totals[-3:]) < 0.8 * np.mean(totals[:3])  # it learns


@pytest.fixture(scope="module")
def lite_weights(tmp_path_factory):
    from detectron2.engine import SimpleTrainer
    from detectron2.modeling import build_model

    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
    SimpleTrainer(model, phantom_batches(0, 128), opt).train(0, 60)
    path = str(tmp_path_factory.mktemp("lite") / "model.pth")
    torch.save({"model": model.state_dict()}, path)
    return path


def test_light_detector_exports_and_matches_eager(lite_weights, tmp_path):
    from usdet.data.phantom import render_phantom
    from usdet.utils.io import atomic_write_image

    rng = np.random.default_rng(3)
    frames = []
    for i in range(3):
        img, _, _ = render_phantom(rng, (128, 150), kinds=["benign"])
        frames.append(str(tmp_path / f"f{i}.png"))
        atomic_write_image(frames[-1], img)
    export = load_tool("export_model")
    for fmt in ("torchscript", "onnx"):
        assert export.main(["--config-file", LITE_CFG, "--weights", lite_weights, "--format", fmt,
                            "--output", str(tmp_path / fmt)]) == 0
    results = {}
    exported = {"torch": lite_weights, "torchscript": str(tmp_path / "torchscript" / "model.ts"),
                "onnxruntime": str(tmp_path / "onnx" / "model.onnx")}
    for backend, weights in exported.items():
        argv = ["--backend", backend, "--weights", weights, "--input", *frames, "--output", str(tmp_path / f"p_{backend}"),
                "--score-thresh", "0.05", "--no-progress"]
        if backend == "torch":
            argv += ["--config-file", LITE_CFG]
        assert load_tool("predict").main(argv) == 0
        records = json.loads((tmp_path / f"p_{backend}" / "predictions.json").read_text())
        results[backend] = {(r["source"], r["frame"]): r for r in records}
    assert sum(len(r["boxes"]) for r in results["torch"].values()) > 0
    for backend in ("torchscript", "onnxruntime"):
        assert _assert_same_detections(results["torch"], results[backend], backend) > 0
