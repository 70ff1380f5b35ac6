"""Truth-vs-prediction overlays named by outcome, and contact sheets of the worst errors.

Readers judge a detector by looking at its mistakes. Each image is drawn with detectron2's
``Visualizer`` (truth and predictions in two colour-blind-safe colours, with a legend), named
by its outcome (TP/FP/FN/TN and IoU) so a folder listing already sorts the errors, and can be
mapped back onto the full scanner frame through the converter's ``crop_box``. A contact sheet
collects the highest-scoring false positives and the misses (as MMDetection's
``analyze_results`` does).
"""
from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.utils.visualizer import Visualizer

from usdet.data.crop import boxes_to_source
from usdet.evaluation.inputs import DetectionData, build_detection_data
from usdet.evaluation.matching import box_iou_xywh, greedy_match

logger = logging.getLogger(__name__)

# Sky blue vs vermillion-orange: distinct for common colour-vision deficiencies and on grey speckle.
TRUTH_COLOR = (0, 176, 255)
PRED_COLOR = (255, 80, 0)
CROP_COLOR = (255, 230, 0)
IGNORE_COLOR = (170, 170, 170)  # ignore regions (COCO iscrowd): dashed grey, never a lesion
TARGET_LONG_SIDE = 768  # small crops are enlarged so labels stay legible


def _rgb01(c: Sequence[int]) -> Tuple[float, float, float]:
    return tuple(v / 255.0 for v in c)


def overlay_scale(height: int, width: int) -> float:
    """Drawing scale used for an image of this size (enlarges small images, never shrinks)."""
    return max(1.0, TARGET_LONG_SIDE / float(max(height, width, 1)))


class OverlayVisualizer(Visualizer):
    """detectron2 Visualizer with line width and font set from the *output* size, so boxes are
    equally visible on 128 px phantoms and 1024 px frames."""

    def __init__(self, img_rgb: np.ndarray, scale: float = 1.0):
        super().__init__(img_rgb, metadata=None, scale=scale)
        out_long = max(self.output.height, self.output.width) * scale
        # font size is in input pixels (Visualizer multiplies by scale); ~1.6% of the long side.
        self._default_font_size = max(out_long / 60.0, 8.0) / scale

    def draw_labeled_box(
        self, box_xyxy: Sequence[float], color: Sequence[int], label: str = "", line_style: str = "-"
    ) -> None:
        self.draw_box(tuple(float(v) for v in box_xyxy), alpha=1.0, edge_color=_rgb01(color), line_style=line_style)
        if label:
            x0, y0 = float(box_xyxy[0]), float(box_xyxy[1])
            fs = self._default_font_size
            # above the box when there is room, else just inside it
            ty = y0 - 1.6 * fs if y0 > 2 * fs else y0 + 0.2 * fs
            self.draw_text(label, (x0, ty), color=_rgb01(color), horizontal_alignment="left", font_size=fs)

    def add_legend(self, entries: Sequence[Tuple[str, Sequence[int]]], title: Optional[str] = None) -> None:
        from matplotlib.lines import Line2D

        handles = [Line2D([0], [0], color=_rgb01(c), lw=3, label=name, ls="--" if c == IGNORE_COLOR else "-")
                   for name, c in entries]
        fs = self._default_font_size * self.output.scale * 0.9
        leg = self.output.ax.legend(
            handles=handles, loc="lower right", fontsize=fs, framealpha=0.75, title=title,
            title_fontsize=fs,
        )
        leg.get_frame().set_facecolor("black")
        for text in leg.get_texts():
            text.set_color("white")
        if leg.get_title() is not None:
            leg.get_title().set_color("white")


def draw_overlay(
    image_rgb: np.ndarray,
    truth_boxes: Sequence[Sequence[float]] = (),
    truth_labels: Sequence[str] = (),
    pred_boxes: Sequence[Sequence[float]] = (),
    pred_scores: Sequence[float] = (),
    pred_labels: Sequence[str] = (),
    crop_box: Optional[Sequence[float]] = None,
    title: Optional[str] = None,
    scale: Optional[float] = None,
    show_truth: Optional[bool] = None,
    ignore_boxes: Sequence[Sequence[float]] = (),
) -> np.ndarray:
    """Draw truth and predicted boxes (xyxy, image pixels) with a legend; return RGB uint8.

    ``ignore_boxes`` (ignore regions, xyxy) are drawn dashed grey and listed in the legend.

    The output is ``scale`` times the input (default :func:`overlay_scale`). With ``crop_box``
    (a full scanner frame), everything outside it is blacked out: the workspace carries
    burned-in patient name, ID and date, which must never reach an output.
    ``show_truth``: list "truth" in the legend (default: when truth boxes are given).
    """
    if scale is None:
        scale = overlay_scale(*image_rgb.shape[:2])
    if crop_box is not None:
        x0, y0, x1, y1 = (int(round(float(v))) for v in crop_box)
        hidden = np.zeros_like(image_rgb)
        hidden[max(y0, 0):y1, max(x0, 0):x1] = image_rgb[max(y0, 0):y1, max(x0, 0):x1]
        image_rgb = hidden
    vis = OverlayVisualizer(image_rgb, scale=scale)
    show_truth = len(truth_boxes) > 0 if show_truth is None else show_truth
    entries = ([("truth", TRUTH_COLOR)] if show_truth else []) + [("prediction", PRED_COLOR)]
    if crop_box is not None:
        vis.draw_labeled_box(crop_box, CROP_COLOR)
        entries.append(("crop", CROP_COLOR))
    if len(ignore_boxes):
        entries.append(("ignore region", IGNORE_COLOR))
    for box in ignore_boxes:
        vis.draw_labeled_box(box, IGNORE_COLOR, "ignore", line_style="--")
    for i, box in enumerate(truth_boxes):
        label = truth_labels[i] if i < len(truth_labels) else ""
        vis.draw_labeled_box(box, TRUTH_COLOR, label)
    # lowest score first so the best prediction is drawn on top
    order = np.argsort(np.asarray(pred_scores, dtype=float), kind="stable") if len(pred_scores) else range(len(pred_boxes))
    for i in order:
        name = pred_labels[i] if i < len(pred_labels) else ""
        score = f"{pred_scores[i]:.2f}" if i < len(pred_scores) else ""
        vis.draw_labeled_box(pred_boxes[i], PRED_COLOR, f"{name} {score}".strip())
    vis.add_legend(entries, title=title)
    return vis.get_output().get_image()


# ---------------------------------------------------------------------------------------------
# Outcomes


@dataclass
class ImageOutcome:
    """Class-agnostic outcome of one image at a score threshold and IoU threshold."""

    outcome: str  # "TN", "TP", "FP", "FN" or combinations like "TP-FP", "FN-FP"
    best_iou: float  # highest IoU between any kept prediction and any truth (0 if none)
    tp: int
    fp: int
    fn: int
    matched: List[Tuple[int, int, float]] = field(default_factory=list)  # (truth, pred, iou)
    fp_preds: List[int] = field(default_factory=list)
    missed_truths: List[int] = field(default_factory=list)


def match_image(
    truth_boxes: Sequence[Sequence[float]],
    pred_boxes: Sequence[Sequence[float]],
    pred_scores: Sequence[float],
    iou_thresh: float = 0.5,
) -> ImageOutcome:
    """Outcome of one image (boxes xyxy) by usdet's one greedy matcher (:func:`greedy_match`).

    The outcome names the kinds of result present: TP (a truth found), FN (a truth missed),
    FP (a prediction matching no truth), TN (no truth and no prediction).
    """
    t = _xyxy_to_xywh(np.asarray(truth_boxes, dtype=np.float64).reshape(-1, 4))
    p = _xyxy_to_xywh(np.asarray(pred_boxes, dtype=np.float64).reshape(-1, 4))
    s = np.asarray(pred_scores, dtype=np.float64).reshape(-1)
    m = greedy_match(np.zeros(len(p), np.int64), s, p, np.zeros(len(t), np.int64), t, 1, iou_thresh)
    matched = [(int(g), int(c), float(i)) for c, g, i in zip(m.cand, m.gt_index, m.iou) if g >= 0]
    fps = [int(c) for c, g in zip(m.cand, m.gt_index) if g < 0]
    used = {g for g, _, _ in matched}
    missed = [i for i in range(len(t)) if i not in used]
    parts = [name for name, items in (("TP", matched), ("FN", missed), ("FP", fps)) if items]
    outcome = "-".join(parts) if parts else "TN"
    best = float(box_iou_xywh(p[:, None, :], t[None, :, :]).max()) if len(p) and len(t) else 0.0
    return ImageOutcome(outcome, best, len(matched), len(fps), len(missed), matched, fps, missed)


def outcome_file_name(file_name: str, outcome: ImageOutcome, ext: str = ".png") -> str:
    """``<outcome>_iou<best IoU>_<image stem>.png``: sorting a folder groups the errors."""
    stem = os.path.splitext(os.path.basename(file_name))[0]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem)
    return f"{outcome.outcome}_iou{outcome.best_iou:.2f}_{stem}{ext}"


# ---------------------------------------------------------------------------------------------
# Contact sheets


def contact_sheet(
    tiles: Sequence[Tuple[np.ndarray, str]], title: str, cols: int = 4, tile_size: int = 256
) -> np.ndarray:
    """Grid of captioned tiles (RGB), rendered with matplotlib; returns RGB uint8."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = max(len(tiles), 1)
    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    inch = tile_size / 100.0
    fig = Figure(figsize=(cols * inch, rows * (inch + 0.35) + 0.5), dpi=100)
    canvas = FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=12)
    if not tiles:
        fig.text(0.5, 0.5, "none", ha="center", va="center", fontsize=14)
    for k, (img, caption) in enumerate(tiles):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(img)
        ax.set_title(caption, fontsize=7)
        ax.axis("off")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[:, :, :3].copy()


def _crop_around(image: np.ndarray, box: Sequence[float], margin: float = 1.0, min_size: int = 48) -> np.ndarray:
    """The box with ``margin`` x its size of context on each side (for sheet tiles)."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = box
    bw, bh = max(x1 - x0, min_size / 3), max(y1 - y0, min_size / 3)
    cx0 = int(max(0, np.floor(x0 - margin * bw)))
    cy0 = int(max(0, np.floor(y0 - margin * bh)))
    cx1 = int(min(w, np.ceil(x1 + margin * bw)))
    cy1 = int(min(h, np.ceil(y1 + margin * bh)))
    if cx1 <= cx0 or cy1 <= cy0:
        return image
    return image[cy0:cy1, cx0:cx1]


# ---------------------------------------------------------------------------------------------
# COCO ground truth + coco_instances_results.json -> overlay folder


def _xywh_to_xyxy(b: Sequence[float]) -> List[float]:
    x, y, w, h = [float(v) for v in b]
    return [x, y, x + w, y + h]


def _xyxy_to_xywh(b: np.ndarray) -> np.ndarray:
    return np.c_[b[:, :2], b[:, 2:] - b[:, :2]]


def image_to_source(boxes_xyxy: Sequence[Sequence[float]], entry: dict, image_hw: Tuple[int, int]) -> List[List[float]]:
    """Boxes of a converted image mapped onto its full source frame.

    A converted image is the source's ``crop_box`` (source pixels), resized by ``scale``
    (``--max-size``) to ``width`` x ``height``: per axis, source = image * crop size / image size +
    crop origin. Without ``crop_box`` the whole source was kept (only resized).
    """
    h, w = entry.get("height") or image_hw[0], entry.get("width") or image_hw[1]
    scale = float(entry.get("scale", 1.0) or 1.0)
    cb = entry.get("crop_box") or [0, 0, w / scale, h / scale]
    return boxes_to_source(boxes_xyxy, cb, (w, h)).tolist()


def _read_source_frame(source_root: str, source_file: str) -> np.ndarray:
    """Full source frame named by an image entry's ``source_file`` (``path`` or ``path#frame``
    for a DICOM frame)."""
    from usdet.data.image_io import ImageReadError, read_image

    frame = None
    m = re.match(r"^(.*)#(?:frame)?(\d+)$", source_file)
    path = os.path.join(source_root, m.group(1) if m else source_file)
    if m or path.lower().endswith((".dcm", ".dicom")) or not os.path.splitext(path)[1]:
        from usdet.data.sources import iter_source_frames

        want = int(m.group(2)) if m else None
        for idx, fr in iter_source_frames(path):
            if idx == want or want is None:
                frame = fr
                break
        if frame is None:
            raise ImageReadError(path, f"frame {want} not found")
        return frame
    return read_image(path)


@dataclass
class _ImageBoxes:
    """Truth, kept predictions and ignore regions of one image (xyxy), after the evaluation's
    cleaner and ignore-region rule."""

    truth: List[List[float]]
    truth_labels: List[str]
    preds: List[List[float]]
    scores: List[float]
    pred_labels: List[str]
    ignore: List[List[float]]


def _boxes_by_image(data: DetectionData) -> Dict[int, _ImageBoxes]:
    names = data.categories
    out: Dict[int, _ImageBoxes] = {}
    for k in range(data.num_images):
        g = data.gt_image == k
        p = data.pred_image == k
        out[k] = _ImageBoxes(
            truth=[_xywh_to_xyxy(b) for b in data.gt_boxes[g]],
            truth_labels=[names.get(int(c), str(c)) for c in data.gt_classes[g]],
            preds=[_xywh_to_xyxy(b) for b in data.pred_boxes[p]],
            scores=[float(v) for v in data.pred_scores[p]],
            pred_labels=[names.get(int(c), str(c)) for c in data.pred_classes[p]],
            ignore=[_xywh_to_xyxy(b) for b in data.ignore_boxes[data.ignore_image == k]],
        )
    return out


def visualize_coco_results(
    gt: dict,
    predictions: Sequence[dict],
    image_root: str,
    output_dir: str,
    conf_threshold: float = 0.5,
    iou_thresh: float = 0.5,
    original: bool = False,
    source_root: Optional[str] = None,
    worst_k: int = 16,
    progress: bool = True,
    source_names: Optional[Dict[str, str]] = None,
    image_overlays: bool = True,
) -> dict:
    """Write one overlay per ground-truth image plus contact sheets and ``summary.json``.

    Truth and detections go through the evaluation's cleaner and ignore-region rule
    (:func:`usdet.evaluation.inputs.build_detection_data`): ignore regions are drawn dashed grey,
    and detections the rule removes are neither drawn nor counted. Files:
    ``OUTPUT/<outcome>_iou<x>_<stem>.png`` (crop as the model saw it), ``OUTPUT/original/...``
    (full source frame, with ``original``: boxes mapped through ``crop_box`` and ``scale``),
    ``OUTPUT/worst_false_positives.png``, ``OUTPUT/worst_misses.png``, ``OUTPUT/summary.json``.
    ``source_names`` maps a pseudonymous ``source_file`` to its real path under ``source_root``
    (the hospital converter's ``--mapping``); the real path never reaches an output.
    Images that cannot be read are listed in the summary with the reason; the rest are drawn.
    ``image_overlays=False`` writes only the sheets and the summary (report.html's worst cases).
    """
    from tqdm import tqdm

    from usdet.data.image_io import read_image
    from usdet.utils.io import atomic_write_image, atomic_write_json

    if original and not source_root:
        raise ValueError("original overlays need source_root (the folder source_file is relative to)")
    image_ids = {im["id"] for im in gt.get("images", []) if isinstance(im, dict) and "id" in im}
    unknown = sum(1 for p in predictions if p.get("image_id") not in image_ids)
    if unknown:
        logger.warning("%d predictions refer to image ids not in the ground truth; ignored", unknown)
    kept = [p for p in predictions if p.get("image_id") in image_ids and float(p.get("score", 1.0)) >= conf_threshold]
    data = build_detection_data(gt, kept)
    boxes = _boxes_by_image(data)
    entries = {im["id"]: im for im in gt.get("images", []) if isinstance(im, dict) and "id" in im}

    os.makedirs(output_dir, exist_ok=True)
    counts: Dict[str, int] = defaultdict(int)
    totals = {"tp": 0, "fp": 0, "fn": 0}
    failures, per_image = [], []
    fp_items, miss_items = [], []  # (sort key, image index, box, caption)
    ids = data.image_ids.tolist()
    order = sorted(range(data.num_images), key=lambda k: ids[k])

    for k in tqdm(order, desc="overlays", unit="img", disable=not progress):
        im, b = entries[ids[k]], boxes[k]
        res = match_image(b.truth, b.preds, b.scores, iou_thresh)
        counts[res.outcome] += 1
        totals["tp"] += res.tp
        totals["fp"] += res.fp
        totals["fn"] += res.fn
        name = outcome_file_name(im["file_name"], res)
        try:
            img = read_image(os.path.join(image_root, im["file_name"]))
        except Exception as e:
            failures.append({"image_id": im["id"], "file_name": im["file_name"], "reason": str(e)})
            tqdm.write(f"skipped {im['file_name']}: {e}")
            continue
        title = f"{res.outcome}  IoU {res.best_iou:.2f}"
        if image_overlays:
            atomic_write_image(os.path.join(output_dir, name),
                               draw_overlay(img, b.truth, b.truth_labels, b.preds, b.scores, b.pred_labels, title=title,
                                            show_truth=True, ignore_boxes=b.ignore))
        entry = {"image_id": im["id"], "file_name": im["file_name"], "overlay": name if image_overlays else None,
                 "outcome": res.outcome,
                 "best_iou": round(res.best_iou, 4), "tp": res.tp, "fp": res.fp, "fn": res.fn,
                 "ignore_regions": len(b.ignore)}
        if original:
            problem = _draw_original(im, img, b, res, title, name, source_root, source_names, output_dir)
            if problem:
                failures.append({"image_id": im["id"], "file_name": im["file_name"], "reason": problem})
                tqdm.write(f"no original overlay for {im['file_name']}: {problem}")
            else:
                entry["overlay_original"] = os.path.join("original", name)
        per_image.append(entry)
        for pi in res.fp_preds:
            fp_items.append((-b.scores[pi], k, b.preds[pi],
                             f"FP {b.pred_labels[pi]} {b.scores[pi]:.2f}\n{os.path.basename(im['file_name'])}"))
        for ti in res.missed_truths:
            # worst misses: no prediction near them at all, then the largest
            t = _xyxy_to_xywh(np.asarray([b.truth[ti]]))
            near_iou = box_iou_xywh(_xyxy_to_xywh(np.asarray(b.preds).reshape(-1, 4)), t)
            near = [s for s, v in zip(b.scores, near_iou) if v > 0.1]
            best_near = max(near) if near else 0.0
            area = float(t[0, 2] * t[0, 3])
            miss_items.append(((best_near, -area), k, b.truth[ti],
                               f"FN {b.truth_labels[ti]} (best nearby {best_near:.2f})\n{os.path.basename(im['file_name'])}"))

    def tiles(items):
        out = []
        for _, k, box, caption in sorted(items, key=lambda t: t[0])[:worst_k]:
            # re-read only the K images shown, so memory does not grow with the dataset
            im = entries[ids[k]]
            img = read_image(os.path.join(image_root, im["file_name"]))
            bk = boxes[k]
            full = draw_overlay(img, bk.truth, (), bk.preds, bk.scores, (), scale=1.0, ignore_boxes=bk.ignore)
            out.append((_crop_around(full, box), caption))
        return out

    if worst_k > 0:
        atomic_write_image(os.path.join(output_dir, "worst_false_positives.png"),
                           contact_sheet(tiles(fp_items), f"Highest-scoring false positives (score >= {conf_threshold})"))
        atomic_write_image(os.path.join(output_dir, "worst_misses.png"),
                           contact_sheet(tiles(miss_items), f"Missed lesions (IoU < {iou_thresh} at score >= {conf_threshold})"))
    summary = {
        "conf_threshold": conf_threshold,
        "iou_threshold": iou_thresh,
        "num_images": data.num_images,
        "outcomes": dict(sorted(counts.items())),
        "boxes": totals,
        "ignore_regions": int(len(data.ignore_image)),
        "detections_in_ignore_regions": int(data.num_ignored_predictions),
        "images": per_image,
        "failures": failures,
        "ground_truth_problems": data.warnings,
    }
    atomic_write_json(os.path.join(output_dir, "summary.json"), summary)
    return summary


def _draw_original(im: dict, img: np.ndarray, b: _ImageBoxes, res: ImageOutcome, title: str, name: str,
                   source_root: str, source_names: Optional[Dict[str, str]], output_dir: str) -> Optional[str]:
    """Draw one image's boxes on its full source frame; return a problem (without real paths) or None."""
    from usdet.utils.io import atomic_write_image

    source = im.get("source_file")
    if not source:
        return "original frame: image entry has no source_file"
    real = source
    if source_names is not None:
        if source not in source_names:
            return f"original frame: source_file {source} is not in the mapping"
        real = source_names[source]
    try:
        src = _read_source_frame(source_root, real)
    except Exception as e:
        # the message names the real path; a pseudonymized source keeps only its pseudonym
        reason = str(e) if source_names is None else type(e).__name__
        return f"original frame {source}: {reason}"
    hw = img.shape[:2]
    cb = im.get("crop_box")
    oimg = draw_overlay(src, image_to_source(b.truth, im, hw), b.truth_labels, image_to_source(b.preds, im, hw),
                        b.scores, b.pred_labels, crop_box=cb, title=title, show_truth=True,
                        ignore_boxes=image_to_source(b.ignore, im, hw))
    atomic_write_image(os.path.join(output_dir, "original", name), oimg)
    return None
