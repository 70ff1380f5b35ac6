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
from detectron2.structures import Boxes, pairwise_iou
from detectron2.utils.visualizer import Visualizer

logger = logging.getLogger(__name__)

# Sky blue vs vermillion-orange: distinct for common colour-vision deficiencies and on grey speckle.
TRUTH_COLOR = (0, 176, 255)
PRED_COLOR = (255, 80, 0)
CROP_COLOR = (255, 230, 0)
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

    def draw_labeled_box(self, box_xyxy: Sequence[float], color: Sequence[int], label: str = "") -> None:
        self.draw_box(tuple(float(v) for v in box_xyxy), alpha=1.0, edge_color=_rgb01(color))
        if label:
            x0, y0 = float(box_xyxy[0]), float(box_xyxy[1])
            fs = self._default_font_size
            # above the box when there is room, else just inside it
            ty = y0 - 1.6 * fs if y0 > 2 * fs else y0 + 0.2 * fs
            self.draw_text(label, (x0, ty), color=_rgb01(color), horizontal_alignment="left", font_size=fs)

    def add_legend(self, entries: Sequence[Tuple[str, Sequence[int]]], title: Optional[str] = None) -> None:
        from matplotlib.lines import Line2D

        handles = [Line2D([0], [0], color=_rgb01(c), lw=3, label=name) for name, c in entries]
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
) -> np.ndarray:
    """Draw truth and predicted boxes (xyxy, image pixels) with a legend; return RGB uint8.

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
    """Greedy matching by descending score, each truth used once (COCO's rule).

    The outcome names the kinds of result present: TP (a truth found), FN (a truth missed),
    FP (a prediction matching no truth), TN (no truth and no prediction).
    """
    t = np.asarray(truth_boxes, dtype=np.float64).reshape(-1, 4)
    p = np.asarray(pred_boxes, dtype=np.float64).reshape(-1, 4)
    s = np.asarray(pred_scores, dtype=np.float64).reshape(-1)
    if len(t) and len(p):
        ious = pairwise_iou(Boxes(p), Boxes(t)).numpy()  # preds x truths
    else:
        ious = np.zeros((len(p), len(t)))
    used = np.zeros(len(t), dtype=bool)
    matched, fps = [], []
    for pi in np.argsort(-s, kind="stable"):
        cand = np.where(~used)[0]
        if len(cand):
            ti = cand[np.argmax(ious[pi, cand])]
            if ious[pi, ti] >= iou_thresh:
                used[ti] = True
                matched.append((int(ti), int(pi), float(ious[pi, ti])))
                continue
        fps.append(int(pi))
    missed = [int(i) for i in np.where(~used)[0]]
    parts = []
    if matched:
        parts.append("TP")
    if missed:
        parts.append("FN")
    if fps:
        parts.append("FP")
    outcome = "-".join(parts) if parts else "TN"
    best = float(ious.max()) if ious.size else 0.0
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


def load_ground_truth(gt_json: Optional[str] = None, dataset: Optional[str] = None) -> Tuple[dict, str]:
    """COCO dict and image root from a JSON file (images relative to its layout root) or a
    registered dataset name (its metadata's ``json_file`` / ``image_root``)."""
    import json

    if dataset:
        from detectron2.data import MetadataCatalog

        import usdet.data  # noqa: F401  (registers $USDET_DATASETS)

        meta = MetadataCatalog.get(dataset)
        gt_json = meta.get("json_file", None)
        if not gt_json:
            raise ValueError(f"dataset {dataset!r} is not registered with a json_file (see usdet.data.register)")
        image_root = meta.get("image_root", os.path.dirname(os.path.dirname(gt_json)))
    else:
        if not gt_json:
            raise ValueError("give a ground-truth COCO JSON (--gt) or a registered dataset (--dataset)")
        # usdet layout: OUT/annotations/<split>.json with file_name relative to OUT
        image_root = os.path.dirname(os.path.dirname(os.path.abspath(gt_json)))
    with open(gt_json) as f:
        return json.load(f), image_root


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
    image_overlays: bool = True,
) -> dict:
    """Write one overlay per ground-truth image plus contact sheets and ``summary.json``.

    Files: ``OUTPUT/<outcome>_iou<x>_<stem>.png`` (crop as the model saw it),
    ``OUTPUT/original/...`` (full source frame, with ``original``),
    ``OUTPUT/worst_false_positives.png``, ``OUTPUT/worst_misses.png``, ``OUTPUT/summary.json``.
    Images that cannot be read are listed in the summary with the reason; the rest are drawn.
    ``image_overlays=False`` writes only the sheets and the summary (report.html's worst cases).
    """
    from tqdm import tqdm

    from usdet.data.image_io import read_image
    from usdet.utils.io import atomic_write_image, atomic_write_json

    if original and not source_root:
        raise ValueError("--original needs --source-root (the folder source_file is relative to)")
    cat_names = {c["id"]: c["name"] for c in gt.get("categories", [])}
    truths: Dict[int, list] = defaultdict(list)
    for a in gt.get("annotations", []):
        if not a.get("iscrowd", 0):
            truths[a["image_id"]].append(a)
    preds: Dict[int, list] = defaultdict(list)
    image_ids = {im["id"] for im in gt.get("images", [])}
    unknown = 0
    for p in predictions:
        if p["image_id"] not in image_ids:
            unknown += 1
            continue
        if float(p.get("score", 1.0)) >= conf_threshold:
            preds[p["image_id"]].append(p)
    if unknown:
        logger.warning("%d predictions refer to image ids not in the ground truth; ignored", unknown)

    os.makedirs(output_dir, exist_ok=True)
    counts: Dict[str, int] = defaultdict(int)
    totals = {"tp": 0, "fp": 0, "fn": 0}
    failures, per_image = [], []
    fp_items, miss_items = [], []  # (sort key, image id, box, caption)
    images = sorted(gt.get("images", []), key=lambda im: im["id"])
    file_by_id = {im["id"]: im["file_name"] for im in images}

    for im in tqdm(images, desc="overlays", unit="img", disable=not progress):
        tb = [_xywh_to_xyxy(a["bbox"]) for a in truths[im["id"]]]
        tl = [cat_names.get(a["category_id"], str(a["category_id"])) for a in truths[im["id"]]]
        plist = preds[im["id"]]
        pb = [_xywh_to_xyxy(p["bbox"]) for p in plist]
        ps = [float(p.get("score", 1.0)) for p in plist]
        pl = [cat_names.get(p.get("category_id"), str(p.get("category_id"))) for p in plist]
        res = match_image(tb, pb, ps, iou_thresh)
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
                               draw_overlay(img, tb, tl, pb, ps, pl, title=title, show_truth=True))
        entry = {"image_id": im["id"], "file_name": im["file_name"], "overlay": name if image_overlays else None,
                 "outcome": res.outcome,
                 "best_iou": round(res.best_iou, 4), "tp": res.tp, "fp": res.fp, "fn": res.fn}
        if original:
            try:
                src = _read_source_frame(source_root, im["source_file"]) if im.get("source_file") else None
                if src is None:
                    raise ValueError("image entry has no source_file")
                cb = im.get("crop_box") or [0, 0, img.shape[1], img.shape[0]]
                shift = np.array([cb[0], cb[1], cb[0], cb[1]], dtype=float)
                ob = [list(np.asarray(b) + shift) for b in tb]
                opb = [list(np.asarray(b) + shift) for b in pb]
                oimg = draw_overlay(src, ob, tl, opb, ps, pl, crop_box=cb, title=title, show_truth=True)
                atomic_write_image(os.path.join(output_dir, "original", name), oimg)
                entry["overlay_original"] = os.path.join("original", name)
            except Exception as e:
                failures.append({"image_id": im["id"], "file_name": im["file_name"],
                                 "reason": f"original frame: {e}"})
                tqdm.write(f"no original overlay for {im['file_name']}: {e}")
        per_image.append(entry)
        for pi in res.fp_preds:
            fp_items.append((-ps[pi], im["id"], pb[pi], f"FP {pl[pi]} {ps[pi]:.2f}\n{os.path.basename(im['file_name'])}"))
        for ti in res.missed_truths:
            # worst misses: no prediction near them at all, then the largest
            near = [ps[j] for j in range(len(pb)) if _iou(tb[ti], pb[j]) > 0.1]
            best_near = max(near) if near else 0.0
            area = (tb[ti][2] - tb[ti][0]) * (tb[ti][3] - tb[ti][1])
            miss_items.append(((best_near, -area), im["id"], tb[ti],
                               f"FN {tl[ti]} (best nearby {best_near:.2f})\n{os.path.basename(im['file_name'])}"))

    preds_by_img = {k: ([_xywh_to_xyxy(p["bbox"]) for p in v], [float(p.get("score", 1)) for p in v]) for k, v in preds.items()}
    truth_by_img = {k: [_xywh_to_xyxy(a["bbox"]) for a in v] for k, v in truths.items()}

    def tiles(items):
        out = []
        for _, iid, box, caption in sorted(items, key=lambda t: t[0])[:worst_k]:
            # re-read only the K images shown, so memory does not grow with the dataset
            img = read_image(os.path.join(image_root, file_by_id[iid]))
            pb, ps = preds_by_img.get(iid, ([], []))
            full = draw_overlay(img, truth_by_img.get(iid, []), (), pb, ps, (), scale=1.0)
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
        "num_images": len(images),
        "outcomes": dict(sorted(counts.items())),
        "boxes": totals,
        "images": per_image,
        "failures": failures,
    }
    atomic_write_json(os.path.join(output_dir, "summary.json"), summary)
    return summary


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
