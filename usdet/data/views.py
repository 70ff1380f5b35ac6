"""Where the image(s) of one frame are: the DICOM header's ultrasound regions, else the pixels.

Scanners that write ``SequenceOfUltrasoundRegions`` say exactly where their 2D tissue images are,
so those boxes are used as they are (no guessing); the pixel cropper (usdet.data.crop) serves
frames without them. Breast exams often show two images side by side (two planes, before/after
compression) split by a line: such a frame gives one crop per view, so that neither a crop nor a
detection spans both images, the divider and the grey bar. Views are numbered left to right (or
top to bottom); ``view_key`` names them in JSON outputs.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np

from .crop import CropResult, _as_rgb_uint8, find_image_region

__all__ = ["find_views", "regions_to_views", "find_divider", "view_key", "REGION_REASON"]

Box = Tuple[int, int, int, int]
#: every crop taken from the DICOM header begins its reason with this
REGION_REASON = "dicom ultrasound region"
#: a divider column/row is nearly constant along the image (a drawn line, or workspace between the
#: views): its grey-level spread (median absolute deviation) is under LINE_SPREAD of the region's median column spread, while
#: the columns just beside it are speckled (over SIDE_SPREAD of it), also under JPEG ringing
LINE_SPREAD = 0.3
SIDE_SPREAD = 0.5
#: and the images on both sides are textured: median fraction of steps over SMOOTH_STEP grey levels
SMOOTH_STEP = 4
SIDE_TEXTURE = 0.3
#: candidates are found on 1 in ROW_STRIDE pixels along the divider, then checked on all
ROW_STRIDE = 3


def _spread(g: np.ndarray) -> np.ndarray:
    """Median absolute deviation of each column: robust, so text or workspace at an end of a divider
    (a shallower view) does not count."""
    return np.median(np.abs(g - np.median(g, axis=0)), axis=0)


def view_key(frame_key: str, view: Optional[int]) -> str:
    """``<frame key>@view<k>`` for a view of a multi-view frame; the frame key itself otherwise."""
    return frame_key if view is None else f"{frame_key}@view{view}"


def _reading_order(boxes: Sequence[Box]) -> List[int]:
    """Left to right when the boxes stand side by side (no column overlap), else top to bottom."""
    side_by_side = all(min(a[2], b[2]) <= max(a[0], b[0]) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    return sorted(range(len(boxes)), key=lambda i: (boxes[i][0], boxes[i][1]) if side_by_side
                  else (boxes[i][1], boxes[i][0]))


def regions_to_views(regions: Sequence, width: int, height: int) -> Optional[List[CropResult]]:
    """Crops from the header's 2D tissue regions (``usdet.data.dicom.UltrasoundRegion``); None when
    there are none. A region reaching one pixel past the frame is clipped (scanners write MaxX1 =
    Columns); one reaching further is refused: the header does not describe these pixels."""
    tissue = [r for r in regions if getattr(r, "is_tissue_2d", False)]
    boxes = [tuple(int(v) for v in r.box) for r in tissue]
    # a tissue region nested in another (e.g. a zoom box drawn in the image) is part of that image
    boxes = [b for i, b in enumerate(boxes)
             if not any(j != i and o[0] <= b[0] and o[1] <= b[1] and o[2] >= b[2] and o[3] >= b[3] and o != b
                        for j, o in enumerate(boxes))]
    boxes = list(dict.fromkeys(boxes))
    if not boxes:
        return None
    out: List[CropResult] = []
    for i in _reading_order(boxes):
        x0, y0, x1, y1 = boxes[i]
        header = f"[{x0}, {y0}, {x1 - 1}, {y1 - 1}]"  # as written: MinX0, MinY0, MaxX1, MaxY1 (inclusive)
        over = max(x1 - width, y1 - height)
        if x1 - x0 < 2 or y1 - y0 < 2:
            out.append(CropResult(None, 0.0, f"{REGION_REASON} {header} is empty: refused"))
        elif over > 1:
            out.append(CropResult(None, 0.0, f"{REGION_REASON} {header} reaches {over} px past the {width}x{height} "
                                  "frame: refused (the header does not describe these pixels)"))
        else:
            clipped = over == 1
            box = (x0, y0, min(x1, width), min(y1, height))
            note = ", clipped 1 px to the frame" if clipped else ""
            out.append(CropResult(box, 1.0, f"{REGION_REASON} {header} (2D tissue){note}"))
    return out


def find_divider(frame_rgb: np.ndarray, box: Sequence[int]) -> Optional[Tuple[int, int, int]]:
    """A line (or gap) splitting the image region ``box`` into two images: ``(axis, a, b)`` with the
    divider at columns (axis 1) or rows (axis 0) ``a..b-1``; None when the region is one image.

    The divider is smooth along its whole length (a drawn line or the workspace between the
    views); ultrasound speckle is not, and the images on both sides must be textured, so dark
    parts of one image (a cyst, a black sector) are not taken for a divider.
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    grey = cv2.cvtColor(np.ascontiguousarray(frame_rgb[y0:y1, x0:x1, :3]), cv2.COLOR_RGB2GRAY).astype(np.int16)
    for axis in (1, 0):  # side by side first (the common layout), then stacked
        g = grey if axis == 1 else grey.T  # the divider is a column of g
        h, w = g.shape
        if w < 64 or h < 16:
            continue
        rough = (np.abs(np.diff(g, axis=0)) > SMOOTH_STEP).mean(axis=0)
        spread = _spread(g[::ROW_STRIDE])  # a sample along the columns finds candidates cheaply...
        med = float(np.median(spread))
        if med <= 0:
            continue
        flat = spread <= LINE_SPREAD * med
        lo, hi = int(0.3 * w), int(0.7 * w)
        best = None
        c = lo
        while c < hi:
            if not flat[c]:
                c += 1
                continue
            a = c
            while c < w and flat[c]:
                c += 1
            b = c  # divider band a..b-1
            if b - a > max(6, 0.03 * w) or a < 8 or b > w - 8:
                continue
            if (_spread(g[:, a:b]) > LINE_SPREAD * med).any():
                continue  # ...every pixel confirms them (a dotted line sampled in step looks constant)
            if spread[a - 6:a].max() < SIDE_SPREAD * med or spread[b:b + 6].max() < SIDE_SPREAD * med:
                continue  # the band must be a line between speckle, not a dark part of one image
            if np.median(rough[:a]) >= SIDE_TEXTURE and np.median(rough[b:]) >= SIDE_TEXTURE:
                centre = abs((a + b) / 2 - w / 2)
                if best is None or centre < best[0]:
                    best = (centre, a, b)
        if best is not None:
            off = x0 if axis == 1 else y0
            return axis, off + best[1], off + best[2]
    return None


#: workspace added on the divider side of a view's part of the frame, so the cropper sees the view
#: surrounded by workspace as on a single-view screen
PAD = 16


def _view_crop(frame: np.ndarray, axis: int, start: int, stop: int, bounds: Box) -> CropResult:
    """The pixel cropper on the part of the frame holding one view, kept inside ``bounds`` (that
    view's share of the whole image region, whose outer edges the cropper placed on the full frame)."""
    ring = np.concatenate([frame[:2].reshape(-1, 3), frame[-2:].reshape(-1, 3),
                           frame[:, :2].reshape(-1, 3), frame[:, -2:].reshape(-1, 3)])
    bg = np.median(ring, axis=0).astype(np.uint8)
    part = frame[:, start:stop] if axis == 1 else frame[start:stop]
    first = start > 0  # the divider is before this part: pad there
    shape = (part.shape[0], PAD, 3) if axis == 1 else (PAD, part.shape[1], 3)
    pad = np.broadcast_to(bg, shape)
    part = np.concatenate([pad, part] if first else [part, pad], axis=axis)
    res = find_image_region(part)
    if res.box is None:
        return res
    shift = start - (PAD if first else 0)
    x0, y0, x1, y1 = res.box
    box = (x0 + shift, y0, x1 + shift, y1) if axis == 1 else (x0, y0 + shift, x1, y1 + shift)
    box = (max(box[0], bounds[0]), max(box[1], bounds[1]), min(box[2], bounds[2]), min(box[3], bounds[3]))
    if box[2] - box[0] < 8 or box[3] - box[1] < 8:
        return CropResult(None, 0.0, "view region collapsed")
    return CropResult(box, res.confidence, res.reason)


def find_views(frame_rgb: np.ndarray, regions: Sequence = ()) -> List[CropResult]:
    """The crops of one frame: one per DICOM 2D tissue region when the header has them, else the
    pixel cropper's region, split in two when a divider separates two images. A list of one
    ``CropResult`` (possibly refused) is a single-view frame; more are its views in reading order."""
    h, w = frame_rgb.shape[:2]
    from_header = regions_to_views(regions, w, h)
    if from_header is not None:
        return from_header
    whole = find_image_region(frame_rgb)
    if whole.box is None:
        return [whole]
    frame_rgb = _as_rgb_uint8(frame_rgb)  # the cropper accepted it: HxW grey or RGBA work too
    div = find_divider(frame_rgb, whole.box)
    if div is None:
        return [whole]
    axis, a, b = div
    x0, y0, x1, y1 = whole.box
    outer0, outer1 = (x0, x1) if axis == 1 else (y0, y1)
    # each part reaches a little past the region's outer edge, so the cropper still sees workspace there
    halves = [(x0, y0, a, y1), (b, y0, x1, y1)] if axis == 1 else [(x0, y0, x1, a), (x0, b, x1, y1)]
    views = [_view_crop(frame_rgb, axis, 0, a, halves[0]), _view_crop(frame_rgb, axis, b, w if axis == 1 else h, halves[1])]
    where = "side by side" if axis == 1 else "stacked"
    out = []
    for k, v in enumerate(views):
        if v.box is None:
            out.append(CropResult(None, v.confidence, f"dual view ({where}), view {k}: {v.reason}"))
            continue
        lo, hi = (v.box[0], v.box[2]) if axis == 1 else (v.box[1], v.box[3])
        if hi - lo < 0.25 * (outer1 - outer0):  # a sliver, not an image: the split was wrong
            return [whole]
        out.append(CropResult(v.box, min(v.confidence, whole.confidence),
                              f"dual view ({where}, divider at {'x' if axis == 1 else 'y'} {a}..{b - 1}): {v.reason}"))
    return out
