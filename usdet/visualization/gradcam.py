"""Class-activation heatmaps for detectron2's Faster R-CNN, through pytorch-grad-cam.

Hand-written hook CAMs break on two-stage detectors (no single logit to back-propagate; the
original study could not get one to work). pytorch-grad-cam's gradient-free EigenCAM (first
principal component of a layer's activations) and AblationCAM (drop in a detection's score
when each channel is removed) work with detectors; all they need is a model that maps an image
tensor to torchvision-style detections, which :class:`DetectronCAMModel` provides.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import cv2
import numpy as np
import torch
from torch import nn

METHODS = ("eigencam", "ablationcam")
# The layer that localized phantom lesions best for both methods (tests/test_gradcam.py's
# setting): res3 (stride 8) keeps enough spatial detail for small lesions, and on R18/R50 it is
# narrow (128/512 channels), so AblationCAM needs few forward passes.
DEFAULT_LAYERS = {"eigencam": "backbone.bottom_up.res3", "ablationcam": "backbone.bottom_up.res3"}


class DetectronCAMModel(nn.Module):
    """Adapter: ``(N,3,H,W)`` float tensor in the model's input format (already resized) ->
    ``[{"boxes", "labels", "scores"}]`` per image, the output pytorch-grad-cam's detector
    targets (``FasterRCNNBoxScoreTarget``) expect."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> List[dict]:
        h, w = x.shape[-2:]
        inputs = [{"image": im, "height": h, "width": w} for im in x]
        outputs = self.model.inference(inputs, do_postprocess=True)
        result = []
        for o in outputs:
            inst = o["instances"]
            result.append({"boxes": inst.pred_boxes.tensor, "labels": inst.pred_classes, "scores": inst.scores})
        return result


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """Module of ``model`` named ``name`` (e.g. ``backbone.bottom_up.res4``).

    A detectron2 ResNet stage resolves to its last block: ResNet runs its stages from its own
    list, so AblationCAM's swap of the named module would otherwise be bypassed; the last
    block's output *is* the stage's output, so the heatmap is the same.
    """
    name = name[len("model."):] if name.startswith("model.") else name
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        stages = [n for n, _ in model.named_modules() if n.count(".") == 2 and n.startswith("backbone.bottom_up.")]
        hint = ", ".join([n for n in stages if n.rsplit(".", 1)[1] != "stem"] + ["backbone"])
        raise ValueError(f"no layer {name!r} in the model; try one of: {hint}") from None
    if isinstance(layer, nn.Sequential) and len(layer) > 0:
        layer = layer[-1]
    return layer


def _dict_reshape(x):
    """FPN-like layers return {level: map}: bring all levels to the finest size and stack channels."""
    if isinstance(x, dict):
        maps = list(x.values())
        size = maps[0].shape[-2:]
        return torch.cat([nn.functional.interpolate(m.abs(), size, mode="bilinear", align_corners=False)
                          for m in maps], dim=1)
    return x


@dataclass
class Detection:
    box: np.ndarray  # xyxy in the input image's pixels
    score: float
    label: int


def _eigencam_class():
    from pytorch_grad_cam import EigenCAM
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    class DetectionEigenCAM(EigenCAM):
        """EigenCAM with the principal component's sign set by the detections.

        The first principal component of the activations has no sign of its own (SVD gives
        either); on ultrasound the lesion is hypoechoic, and the plain projection often marks
        it as the *minimum*, so after EigenCAM's ReLU the map lights up the tissue around it.
        The sign is therefore chosen so that the map is higher in the middle of the detected
        boxes than over the whole image (the detections are what the map explains); with no
        detection, the library's choice is kept.
        """

        boxes_xyxy: Optional[np.ndarray] = None  # in input-tensor pixels

        def get_cam_image(self, input_tensor, target_layer, target_category, activations, grads, eigen_smooth):
            proj = get_2d_projection(activations)
            if self.boxes_xyxy is None or len(self.boxes_xyxy) == 0:
                return proj
            H, W = input_tensor.shape[-2:]
            for i in range(proj.shape[0]):
                h, w = proj[i].shape
                core = np.zeros((h, w), bool)
                for x0, y0, x1, y1 in self.boxes_xyxy:
                    cx, cy, bw, bh = (x0 + x1) / 2 * w / W, (y0 + y1) / 2 * h / H, (x1 - x0) * w / W, (y1 - y0) * h / H
                    r0, r1 = int(np.floor(cy - bh / 4)), int(np.ceil(cy + bh / 4))
                    c0, c1 = int(np.floor(cx - bw / 4)), int(np.ceil(cx + bw / 4))
                    core[max(r0, 0):max(r1, r0 + 1), max(c0, 0):max(c1, c0 + 1)] = True
                if core.any() and proj[i][core].mean() < proj[i].mean():
                    proj[i] = -proj[i]
            return proj

    return DetectionEigenCAM


@dataclass
class CamResult:
    """Heatmap (HxW float in [0, 1], input image size) for one detection (``None``: image-level)."""

    detection: Optional[Detection]
    heatmap: np.ndarray


class DetectorCAM:
    """Heatmaps for the detections of a detectron2 model on RGB images.

    ``method``: ``eigencam`` (one class-agnostic map per image, fast) or ``ablationcam`` (one map
    per detection, for that detection's box and class; one forward per channel batch).
    """

    def __init__(
        self,
        model: nn.Module,
        cfg,
        method: str = "eigencam",
        layers: Optional[Sequence[str]] = None,
        ablation_batch_size: int = 32,
        ratio_channels_to_ablate: float = 1.0,
    ):
        from detectron2.data import transforms as T

        if method not in METHODS:
            raise ValueError(f"unknown --method {method!r}; choose from {', '.join(METHODS)}")
        self.method = method
        self.model = model.eval()
        self.adapter = DetectronCAMModel(self.model)
        self.layer_names = list(layers) if layers else [DEFAULT_LAYERS[method]]
        self.layers = [resolve_layer(self.model, n) for n in self.layer_names]
        self.aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        self.input_format = cfg.INPUT.FORMAT
        self.device = next(self.model.parameters()).device
        self.ablation_batch_size = ablation_batch_size
        self.ratio = ratio_channels_to_ablate

    def _input(self, image_rgb: np.ndarray) -> torch.Tensor:
        img = image_rgb[:, :, ::-1] if self.input_format == "BGR" else image_rgb
        img = self.aug.get_transform(img).apply_image(img)
        return torch.as_tensor(np.ascontiguousarray(img.transpose(2, 0, 1)), dtype=torch.float32)[None].to(self.device)

    def _cam(self) -> Callable:
        from pytorch_grad_cam import AblationCAM

        if self.method == "eigencam":
            return _eigencam_class()(self.adapter, self.layers, reshape_transform=_dict_reshape)
        from pytorch_grad_cam.ablation_layer import AblationLayer

        return AblationCAM(self.adapter, self.layers, reshape_transform=None, ablation_layer=AblationLayer(),
                           batch_size=self.ablation_batch_size, ratio_channels_to_ablate=self.ratio)

    def __call__(self, image_rgb: np.ndarray, score_thresh: float = 0.5, max_detections: int = 10) -> List[CamResult]:
        """Detections above ``score_thresh`` (best first) with their heatmaps, in ``image_rgb``'s pixels.

        With no detection, EigenCAM still returns the image-level map (``detection=None``).
        """
        from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

        h, w = image_rgb.shape[:2]
        x = self._input(image_rgb)
        sy, sx = h / x.shape[-2], w / x.shape[-1]
        with torch.no_grad():
            det = self.adapter(x)[0]
        keep = (det["scores"] >= score_thresh).nonzero().flatten()[:max_detections]
        boxes = det["boxes"][keep].cpu().numpy()
        labels = det["labels"][keep].cpu().numpy()
        scores = det["scores"][keep].cpu().numpy()
        dets = [Detection(b * np.array([sx, sy, sx, sy]), float(s), int(l)) for b, s, l in zip(boxes, scores, labels)]

        def to_image(cam: np.ndarray) -> np.ndarray:
            return np.clip(cv2.resize(cam.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)

        cam = self._cam()
        try:
            if self.method == "eigencam":
                cam.boxes_xyxy = boxes
                target = [FasterRCNNBoxScoreTarget(labels=labels, bounding_boxes=boxes)]
                with torch.no_grad():
                    heat = to_image(cam(x, targets=target)[0])
                if not dets:
                    return [CamResult(None, heat)]
                return [CamResult(d, heat) for d in dets]
            results = []
            for b, l, d in zip(boxes, labels, dets):
                target = [FasterRCNNBoxScoreTarget(labels=[l], bounding_boxes=[b])]
                with torch.no_grad():
                    results.append(CamResult(d, to_image(cam(x, targets=target)[0])))
            return results
        finally:
            cam.activations_and_grads.release()


def render_cam(
    image_rgb: np.ndarray, result: CamResult, class_names: Sequence[str] = (), title: Optional[str] = None
) -> np.ndarray:
    """Heatmap blended over the image (pytorch-grad-cam's ``show_cam_on_image``) with the box drawn."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    from .overlay import PRED_COLOR, OverlayVisualizer, overlay_scale

    blended = show_cam_on_image(image_rgb.astype(np.float32) / 255.0, result.heatmap, use_rgb=True, image_weight=0.55)
    vis = OverlayVisualizer(blended, scale=overlay_scale(*image_rgb.shape[:2]))
    if result.detection is not None:
        d = result.detection
        name = class_names[d.label] if d.label < len(class_names) else str(d.label)
        vis.draw_labeled_box(d.box, PRED_COLOR, f"{name} {d.score:.2f}")
    if title:
        vis.add_legend([("detection", PRED_COLOR)], title=title)
    return vis.get_output().get_image()


def write_cams(
    cam: DetectorCAM,
    image_paths: Sequence[str],
    output_dir: str,
    class_names: Sequence[str] = (),
    score_thresh: float = 0.5,
    progress: bool = True,
    crop: bool = True,
) -> dict:
    """Heatmap pictures ``<stem>_<method>_det<k>.png`` (``_image`` when nothing is detected) for
    each input; unreadable inputs are listed with the reason. Returns a summary dict.

    With ``crop`` each frame is first cropped to its image region (as the model was trained,
    and so the scanner's burned-in patient data never reaches a picture); a frame whose crop
    is refused is listed, not drawn. Already cropped images are kept whole by the cropper.
    """
    from tqdm import tqdm

    from usdet.data.sources import iter_source_frames
    from usdet.utils.io import atomic_write_image, atomic_write_json

    written, failures = [], []
    layer_text = ", ".join(cam.layer_names)
    for path in tqdm(image_paths, desc=cam.method, unit="img", disable=not progress):
        stem = os.path.splitext(os.path.basename(path))[0]
        try:
            frames = list(iter_source_frames(path))
        except Exception as e:
            failures.append({"source": path, "reason": getattr(e, "reason", str(e))})
            tqdm.write(f"skipped {path}: {getattr(e, 'reason', e)}")
            continue
        for frame_index, image in frames:
            fstem = stem if frame_index is None else f"{stem}_f{frame_index}"
            crop_box = None
            if crop:
                from usdet.data.crop import apply_crop, find_image_region

                found = find_image_region(image)
                if found.box is None:
                    failures.append({"source": path, "frame": frame_index,
                                     "reason": f"crop refused ({found.reason}); not drawn"})
                    tqdm.write(f"skipped {path}: crop refused ({found.reason})")
                    continue
                crop_box = [int(v) for v in found.box]
                image = apply_crop(image, found.box)
            results = cam(image, score_thresh=score_thresh)
            for k, r in enumerate(results):
                suffix = f"det{k}" if r.detection is not None else "image"
                name = f"{fstem}_{cam.method}_{suffix}.png"
                title = f"{cam.method} @ {layer_text}"
                atomic_write_image(os.path.join(output_dir, name), render_cam(image, r, class_names, title))
                entry = {"source": path, "frame": frame_index, "crop_box": crop_box, "file": name}
                if r.detection is not None:
                    entry.update(box_xyxy=[round(float(v), 2) for v in r.detection.box],
                                 score=round(r.detection.score, 4), label=r.detection.label)
                written.append(entry)
    summary = {"method": cam.method, "layers": cam.layer_names, "score_thresh": score_thresh,
               "pictures": written, "failures": failures}
    atomic_write_json(os.path.join(output_dir, "gradcam.json"), summary)
    return summary
