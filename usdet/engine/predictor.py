"""Batched inference on new frames, and the source -> crop -> detect -> original-frame pipeline.

detectron2's ``DefaultPredictor`` runs one image per forward pass; a folder of cine frames
(or a multi-frame DICOM) is far faster in batches, with reading and cropping of the next
frames overlapped with the model. Preprocessing is DefaultPredictor's exactly (same
``ResizeShortestEdge`` test transform, same channel order), so both give the same boxes.
"""
from __future__ import annotations

import logging
import os
import queue
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.structures import Instances

logger = logging.getLogger(__name__)

CropBox = Tuple[int, int, int, int]


class BatchPredictor:
    """Run a detectron2 model built from ``cfg`` on lists of RGB frames, ``batch_size`` at a time.

    Weights come from ``cfg.MODEL.WEIGHTS`` through ``DetectionCheckpointer``, the device from
    ``cfg.MODEL.DEVICE``. Returns one ``Instances`` (boxes in the given frame's pixels) per frame.
    """

    def __init__(self, cfg: CfgNode, batch_size: int = 8, model: Optional[torch.nn.Module] = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.cfg = cfg.clone()
        if model is None:
            model = build_model(self.cfg)
            DetectionCheckpointer(model).load(self.cfg.MODEL.WEIGHTS)
        self.model = model.eval()
        self.device = next(self.model.parameters()).device
        self.aug = T.ResizeShortestEdge(
            [self.cfg.INPUT.MIN_SIZE_TEST, self.cfg.INPUT.MIN_SIZE_TEST], self.cfg.INPUT.MAX_SIZE_TEST
        )
        self.input_format = self.cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be RGB or BGR, got {self.input_format}")
        self.batch_size = int(batch_size)

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
        """Forward already preprocessed inputs in one ``model.inference`` call."""
        if not inputs:
            return []
        with torch.inference_mode():
            outputs = self.model.inference(list(inputs), do_postprocess=True)
        return [o["instances"].to("cpu") for o in outputs]

    def __call__(self, images_rgb: Sequence[np.ndarray]) -> List[Instances]:
        results: List[Instances] = []
        for start in range(0, len(images_rgb), self.batch_size):
            chunk = images_rgb[start : start + self.batch_size]
            results.extend(self.run_batch([self.preprocess(im) for im in chunk]))
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


def map_boxes_to_original(boxes_xyxy: np.ndarray, crop_box: Optional[Sequence[int]]) -> np.ndarray:
    """Shift boxes from crop pixels to source-frame pixels.

    Box coordinates are continuous (pixel i spans [i, i+1)) and ``crop_box`` is
    ``[x0, y0, x1, y1]`` with x1/y1 exclusive, so the exact mapping is a shift by (x0, y0):
    no +-1 (the original study's off-by-one came from mixing the two conventions).
    """
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    if crop_box is None:
        return boxes.copy()
    x0, y0 = float(crop_box[0]), float(crop_box[1])
    return boxes + np.array([x0, y0, x0, y0])


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
    boxes = map_boxes_to_original(instances.pred_boxes.tensor.numpy(), crop_box)
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
    predictor: BatchPredictor,
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

    class_names = list(class_names) if class_names is not None else thing_classes_for(predictor.cfg)
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


def _overlay_writer(out_dir: str) -> Callable[[dict, np.ndarray], None]:
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


def run_predict_tool(args) -> int:
    """Body of tools/predict.py (see its --help); returns the exit status."""
    from usdet.data.sources import list_sources
    from usdet.utils.io import atomic_write_json

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    opts = [o for o in (args.opts or []) if o != "--"]
    try:
        cfg = build_predictor_cfg(args.config_file, args.weights, args.device, opts)
    except (FileNotFoundError, ValueError, KeyError) as e:  # bad config file / key / weights: one line
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"predict: error: {args.config_file}: {msg}", file=sys.stderr)
        return 2
    predictor = BatchPredictor(cfg, batch_size=args.batch_size)
    sources = list_sources(args.input)
    if not sources:
        print(f"no inputs found in {' '.join(args.input)}", file=sys.stderr)
        return 1
    os.makedirs(args.output, exist_ok=True)
    on_frame = _overlay_writer(os.path.join(args.output, "overlays")) if args.overlays else None
    records, failures = predict_sources(
        predictor, sources, score_thresh=args.score_thresh, crop=not args.no_crop,
        on_frame=on_frame, progress=not args.no_progress,
    )
    atomic_write_json(os.path.join(args.output, "predictions.json"), records)
    report = {
        "config_file": args.config_file,
        "weights": args.weights,
        "device": str(predictor.device),
        "score_thresh": args.score_thresh,
        "crop": not args.no_crop,
        "num_sources": len(sources),
        "num_frames": len(records),
        "num_boxes": sum(len(r["boxes"]) for r in records),
        "crop_notes": [{"source": r["source"], "frame": r["frame"], "note": r["crop_note"]}
                       for r in records if "crop_note" in r],
        "failures": failures,
    }
    atomic_write_json(os.path.join(args.output, "report.json"), report)
    print(f"{len(records)} frame(s) from {len(sources) - len({f['source'] for f in failures})} of "
          f"{len(sources)} source(s), {report['num_boxes']} box(es) >= {args.score_thresh}; "
          f"{len(failures)} failed -> {os.path.join(args.output, 'predictions.json')}")
    for f in failures:
        print(f"  FAILED {f['source']}: {f['reason']}", file=sys.stderr)
    return 0 if records else 1
