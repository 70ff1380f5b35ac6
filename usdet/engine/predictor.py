"""Batched inference on new frames, and the source -> crop -> detect -> original-frame pipeline.

detectron2's ``DefaultPredictor`` runs one image per forward pass; a folder of cine frames
(or a multi-frame DICOM) is far faster in batches, with reading and cropping of the next
frames overlapped with the model. Preprocessing is DefaultPredictor's exactly (same
``ResizeShortestEdge`` test transform, same channel order) and frames share a batch only with
frames of the same padded size, so both give the same boxes. Backends: eager PyTorch
(``BatchPredictor``, the model ``--eval-only`` evaluates) or a TorchScript / ONNX export
(``ExportedPredictor``), behind one ``FramePredictor`` interface.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.structures import Instances

from usdet.data.crop import boxes_to_source
from usdet.engine.exported import load_exported
from usdet.engine.hooks import ema_weights

logger = logging.getLogger(__name__)

CropBox = Tuple[int, int, int, int]


def load_inference_weights(model: torch.nn.Module, cfg: CfgNode) -> Tuple[str, str, Optional[Dict[str, Any]]]:
    """Load ``cfg.MODEL.WEIGHTS`` into ``model`` the way ``--eval-only`` does; say which weights.

    Returns ``(weights_used, note, normalization)``. ``weights_used`` is ``"ema"`` when
    ``MODEL.EMA.ENABLED`` and the checkpoint carries EMA weights (loaded in place of the training
    weights), or when it is a ``model_best.pth`` of such a run (the best-model hook saved the
    averaged weights); ``"model"`` otherwise. ``normalization`` is the PIXEL_MEAN/STD the model
    now normalizes with and their ``source``: the checkpoint's record where it has one
    (``UsdetCheckpointer.for_inference``), else the config. A missing or unreadable file raises
    ``FileNotFoundError`` / ``RuntimeError`` naming the file.
    """
    from usdet.engine.checkpoint import UsdetCheckpointer

    path = cfg.MODEL.WEIGHTS
    if not path:
        raise FileNotFoundError("no weights given (MODEL.WEIGHTS / --weights is empty)")
    if "://" not in path and not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: weights file not found")
    ckpt = UsdetCheckpointer.for_inference(model, cfg)
    extra = ckpt.load(path, checkpointables=[])
    extra = extra if isinstance(extra, dict) else {}
    ema = ema_weights(extra)
    if cfg.MODEL.EMA.ENABLED and ema is not None:
        model.load_state_dict(ema)
        used, note = "ema", f"EMA weights stored in {path} (MODEL.EMA.ENABLED), as --eval-only uses"
    elif cfg.MODEL.EMA.ENABLED and "usdet_best" in extra:
        used, note = "ema", f"EMA weights of {path} (the model_best of a MODEL.EMA run: the averaged weights)"
    else:
        used, note = "model", f"training weights of {path}"
        if ema is not None:
            note += " (it also carries EMA weights, unused because MODEL.EMA.ENABLED is off, as in --eval-only)"
    adapted = extra.get("usdet_adaptation")
    if isinstance(adapted, dict):
        note += (f", adapted to a site without labels ({adapted.get('method')} on {adapted.get('num_images')} "
                 f"frame(s); verdict: {adapted.get('verdict')})")
    norm = ckpt.normalization
    if norm is not None:
        note += (f", normalized with PIXEL_MEAN {[round(v, 4) for v in norm['pixel_mean']]} PIXEL_STD "
                 f"{[round(v, 4) for v in norm['pixel_std']]} (the {norm['source']}'s)")
    logger.info("Predicting with the %s", note)
    return used, note, norm


class FramePredictor:
    """What every backend shares: DefaultPredictor's preprocessing and batching over frames.

    ``preprocess`` turns an RGB frame into the model's input (``ResizeShortestEdge`` test
    transform, the config's channel order, uint8 CHW); subclasses implement ``run_batch``.
    """

    backend = "base"

    def __init__(self, min_size: int, max_size: int, input_format: str, class_names: Sequence[str],
                 batch_size: int = 8):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be RGB or BGR, got {input_format}")
        self.aug = T.ResizeShortestEdge([int(min_size), int(min_size)], int(max_size))
        self.input_format = input_format
        self.class_names = list(class_names)
        self.batch_size = int(batch_size)
        self.weights_used = "model"
        self.weights_note = ""
        self.normalization: Optional[Dict[str, Any]] = None  # PIXEL_MEAN/STD the model uses, and their source
        self.tta = False

    def preprocess(self, image_rgb: np.ndarray) -> dict:
        """One model input dict for an HxWx3 uint8 RGB frame (DefaultPredictor's transform)."""
        if image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 RGB frame, got shape {image_rgb.shape}")
        image = image_rgb[:, :, ::-1] if self.input_format == "BGR" else image_rgb
        height, width = image.shape[:2]
        image = self.aug.get_transform(image).apply_image(image)
        # uint8 on the way to the device (4x less to copy); the model normalizes in float.
        tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return {"image": tensor, "height": height, "width": width}

    def run_batch(self, inputs: Sequence[dict]) -> List[Instances]:
        raise NotImplementedError

    def __call__(self, images_rgb: Sequence[np.ndarray]) -> List[Instances]:
        results: List[Instances] = []
        for start in range(0, len(images_rgb), self.batch_size):
            chunk = images_rgb[start : start + self.batch_size]
            results.extend(self.run_batch([self.preprocess(im) for im in chunk]))
        return results


class BatchPredictor(FramePredictor):
    """Run a detectron2 model built from ``cfg`` on lists of RGB frames, ``batch_size`` at a time.

    The model ``--eval-only`` evaluates: weights from ``cfg.MODEL.WEIGHTS`` (the EMA weights when
    the config enables EMA and the checkpoint has them, see ``load_inference_weights``) and
    detectron2's ``GeneralizedRCNNWithTTA`` when ``TEST.FLIP`` / ``TEST.AUG.ENABLED``. The device is
    ``cfg.MODEL.DEVICE``. Returns one ``Instances`` (boxes in the given frame's pixels) per frame.
    """

    backend = "torch"

    def __init__(self, cfg: CfgNode, batch_size: int = 8, model: Optional[torch.nn.Module] = None):
        super().__init__(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, cfg.INPUT.FORMAT,
                         thing_classes_for(cfg), batch_size)
        self.cfg = cfg.clone()
        if model is None:
            model = build_model(self.cfg)
            self.weights_used, self.weights_note, self.normalization = load_inference_weights(model, self.cfg)
        self.model = model.eval()
        self.device = next(self.model.parameters()).device
        self._tta_model = None
        if self.cfg.TEST.FLIP or self.cfg.TEST.AUG.ENABLED:
            from detectron2.modeling import GeneralizedRCNNWithTTA

            from usdet.engine.trainer import tta_config

            self._tta_model = GeneralizedRCNNWithTTA(tta_config(self.cfg), self.model)
            self.tta = True
            logger.info("Test-time augmentation on (TEST.FLIP / TEST.AUG), as in --eval-only")
        self._divisibility = int(getattr(getattr(self.model, "backbone", None), "size_divisibility", 0) or 0)

    def _padded_shape(self, image: torch.Tensor) -> Tuple[int, int]:
        h, w = image.shape[-2:]
        d = self._divisibility
        return (h, w) if d <= 1 else (-(-h // d) * d, -(-w // d) * d)

    def run_batch(self, inputs: Sequence[dict]) -> List[Instances]:
        """Forward already preprocessed inputs, one ``model.inference`` call per padded size.

        Frames are batched only with frames padded to the same size: padding a small frame up to
        a larger one in its batch changes its features near the border (and the anchors the RPN
        sees), so each frame gets exactly the boxes ``DefaultPredictor`` gives it alone.
        """
        if not inputs:
            return []
        if self._tta_model is not None:
            with torch.inference_mode():
                return [o["instances"].to("cpu") for o in self._tta_model(list(inputs))]
        groups: Dict[Tuple[int, int], List[int]] = {}
        for i, x in enumerate(inputs):
            groups.setdefault(self._padded_shape(x["image"]), []).append(i)
        results: List[Optional[Instances]] = [None] * len(inputs)
        with torch.inference_mode():
            for idx in groups.values():
                outputs = self.model.inference([inputs[i] for i in idx], do_postprocess=True)
                for i, o in zip(idx, outputs):
                    results[i] = o["instances"].to("cpu")
        return results  # type: ignore[return-value]


class ExportedPredictor(FramePredictor):
    """A model written by ``tools/export_model.py`` (TorchScript or ONNX), run on CPU.

    Same preprocessing as ``BatchPredictor`` (from the resize rule in the JSON beside the file),
    one frame per call (the exported graph takes one uint8 CHW image, normalization inside), and
    detectron2's own ``detector_postprocess`` to scale boxes back to the frame.
    """

    def __init__(self, path: str, backend: str, batch_size: int = 8, threads: Optional[int] = None):
        self.meta, self._run = load_exported(path, backend, threads=threads)
        rule = self.meta["input"]["resize"]
        super().__init__(rule["short_edge"], rule["max_size"], self.meta["input"]["format"],
                         self.meta["class_names"], batch_size)
        self.backend = backend
        self.device = "cpu"
        self.weights_used = self.meta["weights_used"]
        self.weights_note = f"{self.meta['weights_note']}, exported to {path}"

    def run_batch(self, inputs: Sequence[dict]) -> List[Instances]:
        from detectron2.modeling.postprocessing import detector_postprocess
        from detectron2.structures import Boxes

        results = []
        for x in inputs:
            image = x["image"]
            boxes, scores, classes = self._run(image)
            inst = Instances(tuple(image.shape[-2:]))
            inst.pred_boxes = Boxes(torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4))
            inst.scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
            inst.pred_classes = torch.as_tensor(classes, dtype=torch.int64).reshape(-1)
            results.append(detector_postprocess(inst, x["height"], x["width"]))
        return results


def thing_classes_for(cfg: CfgNode) -> List[str]:
    """Class names for the model's contiguous ids: from the training set's metadata if it is
    registered, else usdet's conventions (1 class: lesion; 2: benign, malignant)."""
    num = int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        if name in MetadataCatalog.list():
            classes = MetadataCatalog.get(name).get("thing_classes", None)
            if classes and len(classes) == num:
                return list(classes)
    if num == 1:
        return ["lesion"]
    if num == 2:
        return ["benign", "malignant"]
    return [f"class_{i}" for i in range(num)]


# ---------------------------------------------------------------------------------------------
# Pipeline: sources (images, folders, DICOM) -> crop -> detect -> boxes in original frames.


@dataclass
class FrameItem:
    """One frame ready for the model, or the reason it is not."""

    source: str
    frame: Optional[int]
    original: Optional[np.ndarray] = None  # full source frame (RGB)
    crop_box: Optional[CropBox] = None
    crop_note: Optional[str] = None
    error: Optional[str] = None
    inputs: Optional[dict] = field(default=None, repr=False)
    view: Optional[int] = None  # k of a multi-view frame (0 = left/top); None for a single image


def _iter_frames(sources: Sequence[str], crop: bool) -> Iterator[FrameItem]:
    """Read and crop every frame of every source; failures become items with ``error`` set.

    Crops come from usdet.data.views (DICOM ultrasound regions, else the pixel cropper); a
    dual-view frame gives one item per view, each with its own crop box, so boxes map back to the
    full frame through it. If a view is refused the frame is run whole (with a note) instead.
    """
    from usdet.data.sources import open_source
    from usdet.data.views import find_views

    for source in sources:
        try:
            src = open_source(source)
            for frame_index, frame in src:
                h, w = frame.shape[:2]
                full = (0, 0, int(w), int(h))
                if not crop:
                    yield FrameItem(source=source, frame=frame_index, original=frame, crop_box=full)
                    continue
                note = None
                try:
                    results = find_views(frame, src.regions)
                except Exception as e:  # a cropper bug must not stop the run
                    results = []
                    note = f"cropper failed ({type(e).__name__}: {e}); used the full frame"
                refused = [r for r in results if r.box is None]
                if refused:
                    which = "" if len(results) == 1 else f" for view {results.index(refused[0])}"
                    note = f"crop refused{which} ({refused[0].reason}); used the full frame"
                if note is not None:
                    yield FrameItem(source=source, frame=frame_index, original=frame, crop_box=full, crop_note=note)
                    continue
                for k, result in enumerate(results):
                    yield FrameItem(source=source, frame=frame_index, original=frame,
                                    crop_box=tuple(int(v) for v in result.box),  # type: ignore[union-attr]
                                    view=k if len(results) > 1 else None)
        except Exception as e:  # ImageReadError / DicomReadError carry file and reason
            reason = getattr(e, "reason", None) or f"{type(e).__name__}: {e}"
            yield FrameItem(source=source, frame=None, error=str(reason))


def _prefetch(it: Iterable[Any], depth: int) -> Iterator[Any]:
    """Run ``it`` in a background thread, ``depth`` items ahead (reading overlaps inference)."""
    q: "queue.Queue" = queue.Queue(maxsize=max(1, depth))
    done = object()
    errors: list = []

    def worker():
        try:
            for x in it:
                q.put(x)
        except BaseException as e:  # surfaced in the consumer
            errors.append(e)
        finally:
            q.put(done)

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    while True:
        x = q.get()
        if x is done:
            break
        yield x
    t.join()
    if errors:
        raise errors[0]


def instances_to_boxes(
    instances: Instances, crop_box: Optional[Sequence[int]], class_names: Sequence[str], score_thresh: float
) -> List[dict]:
    """JSON-ready boxes (original-frame pixels) above ``score_thresh``, best score first."""
    scores = instances.scores.numpy() if instances.has("scores") else np.zeros(len(instances))
    classes = instances.pred_classes.numpy() if instances.has("pred_classes") else np.zeros(len(instances), int)
    boxes = boxes_to_source(instances.pred_boxes.tensor.numpy(), crop_box)  # crop pixels -> frame pixels
    out = []
    for i in np.argsort(-scores, kind="stable"):
        if scores[i] < score_thresh:
            continue
        c = int(classes[i])
        out.append(
            {
                "bbox_xyxy_original": [round(float(v), 2) for v in boxes[i]],
                "score": round(float(scores[i]), 4),
                "class": class_names[c] if c < len(class_names) else str(c),
            }
        )
    return out


def predict_sources(
    predictor: FramePredictor,
    sources: Sequence[str],
    score_thresh: float = 0.5,
    crop: bool = True,
    class_names: Optional[Sequence[str]] = None,
    on_frame: Optional[Callable[[dict, np.ndarray], None]] = None,
    progress: bool = True,
    prefetch: int = 2,
) -> Tuple[List[dict], List[dict]]:
    """Detect lesions in every frame of ``sources``; return ``(records, failures)``.

    ``records``: ``{source, frame, crop_box, boxes: [{bbox_xyxy_original, score, class}]}`` per
    frame (``crop_note`` added where the cropper refused and the full frame was used).
    ``failures``: ``{source, frame, reason}`` per input that could not be processed; the other
    inputs are processed regardless. ``on_frame(record, original_rgb)`` is called per record
    (overlays).
    """
    from tqdm import tqdm

    class_names = list(class_names) if class_names is not None else predictor.class_names
    records: List[dict] = []
    failures: List[dict] = []
    bar = tqdm(total=len(sources), desc="predict", unit="src", disable=not progress)

    def prepared() -> Iterator[FrameItem]:
        for item in _iter_frames(sources, crop):
            if item.error is None:
                try:
                    x0, y0, x1, y1 = item.crop_box
                    item.inputs = predictor.preprocess(np.ascontiguousarray(item.original[y0:y1, x0:x1]))
                except Exception as e:
                    item.error = f"preprocessing failed ({type(e).__name__}: {e})"
            yield item

    def flush(batch: List[FrameItem]) -> None:
        if not batch:
            return
        outputs = predictor.run_batch([b.inputs for b in batch])
        for item, inst in zip(batch, outputs):
            rec = {
                "source": item.source,
                "frame": item.frame,
                "crop_box": list(item.crop_box),
                "boxes": instances_to_boxes(inst, item.crop_box, class_names, score_thresh),
            }
            if item.crop_note:
                rec["crop_note"] = item.crop_note
            if item.view is not None:  # one record per view of a dual-view frame
                rec["view"] = item.view
            records.append(rec)
            if on_frame is not None:
                on_frame(rec, item.original)

    batch: List[FrameItem] = []
    last_source = None
    try:
        for item in _prefetch(prepared(), prefetch * predictor.batch_size):
            if item.source != last_source:
                if last_source is not None:
                    bar.update(1)
                last_source = item.source
            if item.error is not None:
                failures.append({"source": item.source, "frame": item.frame, "reason": item.error})
                bar.write(f"skipped {item.source}: {item.error}")
                continue
            batch.append(item)
            if len(batch) >= predictor.batch_size:
                flush(batch)
                batch = []
        flush(batch)
        if last_source is not None:
            bar.update(1)
    finally:
        bar.close()
    return records, failures


def build_predictor_cfg(
    config_file: str, weights: str, device: Optional[str] = None, opts: Sequence[str] = ()
) -> CfgNode:
    """The run's config through usdet's one config path (``usdet.engine.setup.build_config``:
    usdet keys, file, overrides, input normalization resolved), with weights and device set."""
    from usdet.engine.setup import build_config

    if device and device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device here (use --device cpu)")
    extra = ["MODEL.WEIGHTS", weights] + (["MODEL.DEVICE", device] if device else [])
    cfg = build_config(config_file, list(opts) + extra)
    cfg.freeze()
    return cfg


def overlay_writer(out_dir: str) -> Callable[[dict, np.ndarray], None]:
    """``on_frame`` callback drawing each frame's boxes (full frame, crop box shown) into out_dir."""
    import re

    from usdet.utils.io import atomic_write_image
    from usdet.visualization.overlay import draw_overlay

    used: set = set()

    def write(rec: dict, original: np.ndarray) -> None:
        if rec.get("crop_note"):
            # no image region found: the frame may still show the scanner's burned-in patient data
            rec["overlay"] = None
            rec["overlay_note"] = "withheld: no crop, the full frame may show burned-in patient data"
            return
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.splitext(os.path.basename(rec["source"]))[0])
        if rec["frame"] is not None:
            stem += f"_f{rec['frame']}"
        name, k = stem, 1
        while name in used:
            k += 1
            name = f"{stem}_{k}"
        used.add(name)
        boxes = rec["boxes"]
        h, w = original.shape[:2]
        full = list(rec["crop_box"]) == [0, 0, w, h]
        img = draw_overlay(
            original,
            pred_boxes=[b["bbox_xyxy_original"] for b in boxes],
            pred_scores=[b["score"] for b in boxes],
            pred_labels=[b["class"] for b in boxes],
            crop_box=None if full else rec["crop_box"],
            title=f"{len(boxes)} detection(s)",
        )
        atomic_write_image(os.path.join(out_dir, name + ".png"), img)
        rec["overlay"] = os.path.join("overlays", name + ".png")

    return write
