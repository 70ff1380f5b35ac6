"""Export a trained usdet model to TorchScript or ONNX with detectron2's tracing API.

detectron2's ``TracingAdapter`` flattens the model's list-of-dicts / ``Instances`` interface to
tensors, ``torch.jit.trace`` records it, and ``torch.onnx.export`` (the TorchScript-based exporter,
``dynamo=False``) turns the same trace into ONNX. The exported graph takes ONE uint8 CHW image in
the config's channel order, already cropped and resized by the predictor's rule
(``ResizeShortestEdge``, PIL bilinear: kept outside the graph so the pixels are exactly the eager
model's), and returns ``boxes`` (xyxy, in that image's pixels), ``scores`` and ``classes``;
normalization, padding, RPN, ROI heads and NMS are inside. A JSON beside the file records the
class names, channel order, resize rule and which weights were exported; the export is checked
against the eager model on a frame of another size before it is reported done. Loading an
exported model back is :mod:`usdet.engine.exported`.
"""
from __future__ import annotations

import importlib
import io
import logging
import os
import sys
import types
import warnings
from typing import Any, Dict, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model

from usdet.data.phantom import render_phantom
from usdet.engine.exported import BACKEND_OF_FORMAT, FORMATS, load_exported, meta_path, runner_from_bytes
from usdet.engine.predictor import FramePredictor, load_inference_weights, thing_classes_for
from usdet.utils.io import atomic_write_bytes, atomic_write_json

__all__ = ["FORMATS", "ExportError", "check_exportable", "export_model", "load_exported", "meta_path"]

logger = logging.getLogger(__name__)

ONNX_OPSET = 17
# agreement asked of an export with the eager model (the parity test asks the same)
BOX_TOL_PX = 0.5
SCORE_TOL = 1e-3


# usdet's RPN differs from detectron2's only in training (ignore regions are not sampled), so its
# inference graph is RPN's.
EXPORTABLE_PROPOSAL_GENERATORS = ("RPN", "UsdetRPN")


class ExportError(ValueError):
    """The config asks for something the exported graph cannot reproduce."""


def check_exportable(cfg: CfgNode) -> None:
    """Raise ``ExportError`` naming the setting when ``cfg``'s inference cannot be exported as is."""
    if cfg.TEST.FLIP or cfg.TEST.AUG.ENABLED:
        raise ExportError("test-time augmentation (TEST.FLIP / TEST.AUG.ENABLED) cannot be exported: it runs the "
                          "model several times in Python and merges the results. Export without it (append "
                          "TEST.FLIP False TEST.AUG.ENABLED False); the exported model then matches --eval-only "
                          "without TTA, not with it")
    if cfg.MODEL.META_ARCHITECTURE != "GeneralizedRCNN":
        raise ExportError(f"MODEL.META_ARCHITECTURE {cfg.MODEL.META_ARCHITECTURE}: only GeneralizedRCNN (usdet's "
                          "Faster R-CNN) is exported")
    if cfg.MODEL.MASK_ON or cfg.MODEL.KEYPOINT_ON:
        raise ExportError("MODEL.MASK_ON / MODEL.KEYPOINT_ON: only box detectors are exported")
    if cfg.MODEL.PROPOSAL_GENERATOR.NAME not in EXPORTABLE_PROPOSAL_GENERATORS:
        raise ExportError(f"MODEL.PROPOSAL_GENERATOR.NAME {cfg.MODEL.PROPOSAL_GENERATOR.NAME}: only "
                          f"{' / '.join(EXPORTABLE_PROPOSAL_GENERATORS)} are exported")
    if cfg.INPUT.FORMAT not in ("RGB", "BGR"):
        raise ExportError(f"INPUT.FORMAT {cfg.INPUT.FORMAT}: only RGB / BGR inputs are exported")


def tracing_adapter_class():
    """detectron2's ``TracingAdapter``.

    detectron2 v0.6's ``detectron2/export/__init__.py`` imports its Caffe2 exporter first, which
    needs the ``caffe2`` package (gone from PyTorch since 2.0), so ``import detectron2.export``
    fails on any current PyTorch, whether detectron2 came from upstream git or from
    tools/install_detectron2.py. The tracing code itself (``export/flatten.py``) does not use
    Caffe2: when the package import fails for that reason only, register the package without
    running its ``__init__`` and import the submodule. Later detectron2 versions guard the import
    themselves and take the first branch.
    """
    try:
        from detectron2.export import TracingAdapter

        return TracingAdapter
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("caffe2"):
            raise
    import detectron2

    pkg = types.ModuleType("detectron2.export")
    pkg.__path__ = [os.path.join(os.path.dirname(detectron2.__file__), "export")]
    sys.modules["detectron2.export"] = pkg
    pkg.TracingAdapter = importlib.import_module("detectron2.export.flatten").TracingAdapter
    return pkg.TracingAdapter


def _inference(model, inputs):
    """The traced function: detectron2's inference without resizing back (done outside, per frame)."""
    inst = model.inference(inputs, do_postprocess=False)[0]
    return inst.pred_boxes.tensor, inst.scores, inst.pred_classes


def _sample_inputs(min_size: int, max_size: int, input_format: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two phantom frames of different shapes through the predictor's resize: trace, then check."""
    prep = FramePredictor(min_size, max_size, input_format, [], 1)
    rng = np.random.default_rng(0)
    trace_rgb, _, _ = render_phantom(rng, (min_size, int(min_size * 1.3)))
    check_rgb, _, _ = render_phantom(rng, (int(min_size * 1.2) + 7, min_size + 3))
    return prep.preprocess(trace_rgb)["image"], prep.preprocess(check_rgb)["image"]


def _compare(got, want) -> Dict[str, Any]:
    """Agreement of an exported model's (boxes, scores, classes) with the eager model's."""
    gb, gs, gc = (np.asarray(x) for x in got)
    wb, ws, wc = (x.detach().cpu().numpy() for x in want)
    out: Dict[str, Any] = {"detections": int(len(ws)), "exported_detections": int(len(gs))}
    if len(gs) != len(ws) or not np.array_equal(gc, wc):
        out["ok"] = False
        return out
    out["max_box_diff_px"] = float(np.abs(gb - wb).max()) if len(ws) else 0.0
    out["max_score_diff"] = float(np.abs(gs - ws).max()) if len(ws) else 0.0
    out["ok"] = out["max_box_diff_px"] <= BOX_TOL_PX and out["max_score_diff"] <= SCORE_TOL
    return out


def export_model(cfg: CfgNode, fmt: str, output_dir: str, config_file: str = "") -> Dict[str, Any]:
    """Write ``output_dir/model.ts`` or ``model.onnx`` and ``model.json``; return the JSON's content.

    The model is the one ``--eval-only`` and ``tools/predict.py`` use (same weights choice,
    EMA included, see ``usdet.engine.predictor.load_inference_weights``), on CPU. Raises
    ``ExportError`` for what cannot be exported and ``RuntimeError`` when the written model
    disagrees with the eager one on the check frame (nothing is left half-written either way).
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    check_exportable(cfg)
    if cfg.MODEL.DEVICE != "cpu":
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.DEVICE = "cpu"
        cfg.freeze()
    model = build_model(cfg)
    weights_used, weights_note, norm = load_inference_weights(model, cfg)
    model.eval()
    trace_img, check_img = _sample_inputs(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, cfg.INPUT.FORMAT)
    # A fresh nn.Module is in training mode and the ONNX exporter restores the adapter's mode
    # afterwards (which would switch the detector to training): evaluation mode from the start.
    adapter = tracing_adapter_class()(model, [{"image": trace_img}], _inference).eval()

    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # Tracing warns at every Python branch on a tensor; the check frame of another size below
        # is what shows the graph generalizes.
        warnings.simplefilter("ignore")
        if fmt == "torchscript":
            traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
            torch.jit.save(traced, buf)
        else:
            torch.onnx.export(adapter, adapter.flattened_inputs, buf, opset_version=ONNX_OPSET, dynamo=False,
                              input_names=["image"], output_names=["boxes", "scores", "classes"],
                              dynamic_axes={"image": {1: "height", 2: "width"}, "boxes": {0: "n"},
                                            "scores": {0: "n"}, "classes": {0: "n"}})
    data = buf.getvalue()

    with torch.no_grad():
        want = _inference(model, [{"image": check_img}])
    run = runner_from_bytes(data, BACKEND_OF_FORMAT[fmt])
    if run is None:
        check: Dict[str, Any] = {"ok": None, "note": "not run: onnxruntime is not installed"}
    else:
        check = _compare(run(check_img), want)
        check["image_size"] = list(check_img.shape[-2:])
        if not check["ok"]:
            raise RuntimeError(f"the {fmt} export disagrees with the PyTorch model on a check frame of size "
                               f"{check['image_size']}: {check}; nothing was written")

    import detectron2

    meta = {
        "format": fmt,
        "file": FORMATS[fmt],
        "backend": BACKEND_OF_FORMAT[fmt],
        "class_names": thing_classes_for(cfg),
        "input": {
            "name": "image", "dtype": "uint8", "layout": "CHW (one image, no batch axis)",
            "format": cfg.INPUT.FORMAT,
            "resize": {"rule": "ResizeShortestEdge", "short_edge": int(cfg.INPUT.MIN_SIZE_TEST),
                       "max_size": int(cfg.INPUT.MAX_SIZE_TEST), "interp": "bilinear (PIL)"},
            "note": "crop the frame, resize it by `resize` (short edge to short_edge, long edge at most "
                    "max_size), pass uint8 channels in `format` order; normalization and padding are inside",
            # what the graph subtracts and divides by: the checkpoint's recorded values where it has them
            "normalization": None if norm is None else {
                "pixel_mean": [round(v, 4) for v in norm["pixel_mean"]],
                "pixel_std": [round(v, 4) for v in norm["pixel_std"]], "source": norm["source"]},
        },
        "outputs": {"boxes": "float32 N x 4, x0 y0 x1 y1 in the input image's pixels",
                    "scores": "float32 N", "classes": "int64 N, index into class_names"},
        "score_thresh_test": float(cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST),
        "nms_thresh_test": float(cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST),
        "detections_per_image": int(cfg.TEST.DETECTIONS_PER_IMAGE),
        "config_file": config_file,
        "weights": cfg.MODEL.WEIGHTS,
        "weights_used": weights_used,
        "weights_note": weights_note,
        "device": "cpu",
        "exported_with": {"torch": torch.__version__, "detectron2": detectron2.__version__},
        "check": check,
    }
    if fmt == "onnx":
        meta["onnx_opset"] = ONNX_OPSET
    os.makedirs(output_dir, exist_ok=True)
    model_file = os.path.join(output_dir, FORMATS[fmt])
    atomic_write_bytes(model_file, data)
    atomic_write_json(meta_path(model_file), meta)
    logger.info("Exported %s (%s weights) to %s", fmt, weights_used, model_file)
    return meta
