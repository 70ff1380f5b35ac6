"""Find the ultrasound image inside a scanner screen capture, or refuse rather than crop wrongly.

Hospital exports burn the scanner's workspace into every frame (header text with patient data,
parameter panel, body marker, depth scale, grey bar, TGC curve, logos). A row/column-sum
threshold fails on dark frames and keeps scale ticks and text; here the workspace is modelled
instead: its flat background colours are learnt from the frame border, every pixel that differs
from them is content, thin content (text, ticks, lines, pictograms) is removed by a density test
and a morphological opening, and the largest remaining region is the image. The box is then
refined at full resolution, edge by edge, so it never cuts into the image; when the evidence is
weak (blank frame, two similar candidates, a flat panel, blurred edges) the result is a refusal
with a reason and ``box=None``.

Analysis runs on a frame downscaled by an integer factor (area averaging keeps flat colours
exact), so a 1024x768 frame takes a few milliseconds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import cv2
import numpy as np

__all__ = ["CropResult", "find_image_region", "apply_crop", "suppress_marks", "ANALYSIS_SIZE"]

Box = Tuple[int, int, int, int]

#: longest side of the downscaled analysis image
ANALYSIS_SIZE = 320
#: confidence below which a candidate is refused
MIN_CONFIDENCE = 0.5


@dataclass
class CropResult:
    """Where the image is: ``box`` = (x0, y0, x1, y1) in source pixels, x1/y1 exclusive; None = refused."""

    box: Optional[Box]
    confidence: float
    reason: str

    @property
    def ok(self) -> bool:
        return self.box is not None

    def to_dict(self) -> Dict[str, object]:
        return {"box": list(self.box) if self.box is not None else None, "reason": self.reason,
                "confidence": round(float(self.confidence), 4)}


def _refuse(reason: str, confidence: float = 0.0) -> CropResult:
    return CropResult(None, float(confidence), reason)


def _as_rgb_uint8(frame: np.ndarray) -> np.ndarray:
    a = np.asarray(frame)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[:, :, :3]
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an HxW or HxWx3 image, got shape {a.shape}")
    if a.dtype != np.uint8:
        if a.dtype == bool:
            a = a.astype(np.uint8) * 255
        elif np.issubdtype(a.dtype, np.floating) and a.size and float(np.nanmax(a)) <= 1.0:
            a = np.clip(np.nan_to_num(a) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        else:
            a = np.clip(a, 0, 255).astype(np.uint8)
    return a


def _background_colours(small: np.ndarray, rng: np.ndarray, border: int) -> Tuple[np.ndarray, float]:
    """Dominant flat colours on the frame border (the workspace) and the fraction of the border they cover."""
    h, w = rng.shape
    ring = np.zeros((h, w), bool)
    ring[:border] = ring[-border:] = True
    ring[:, :border] = ring[:, -border:] = True
    flat = ring & (rng <= 3)
    n_ring = int(ring.sum())
    if not flat.any():
        return np.zeros((0, 3), np.int16), 0.0
    px = small[flat].astype(np.int32)
    # quantize to 4 levels so JPEG-noisy flat areas fall into one bin; the exact colour is the bin's median
    keys = (px[:, 0] >> 2) << 12 | (px[:, 1] >> 2) << 6 | (px[:, 2] >> 2)
    uniq, inv, counts = np.unique(keys, return_inverse=True, return_counts=True)
    order = np.argsort(-counts)
    colours = []
    covered = 0
    for i in order[:8]:
        if counts[i] < max(3, 0.03 * n_ring):
            break
        colours.append(np.median(px[inv == i], axis=0))
        covered += int(counts[i])
    return np.round(np.array(colours)).astype(np.int16).reshape(-1, 3), covered / max(1, n_ring)


def _bg_distance(img: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Per-pixel max-channel distance to the nearest background colour (uint8)."""
    d = None
    img = np.ascontiguousarray(img)
    for c in colours:
        diff = cv2.absdiff(img, np.full_like(img, 0) + c.astype(np.uint8))
        dc = cv2.max(cv2.max(diff[..., 0], diff[..., 1]), diff[..., 2])
        d = dc if d is None else cv2.min(d, dc)
    return d


def _odd(n: float) -> int:
    n = max(1, int(round(n)))
    return n if n % 2 == 1 else n + 1


def _trim_protrusions(blob: np.ndarray, box: Box) -> Box:
    """Cut narrow blocks glued to a side of the image (text or a bar touching it).

    The image's own profile (blob pixels per column/row) grows smoothly from its edge, also for a
    fan whose tips are thin; a block glued to it shows as a low plateau followed by a jump.
    """
    x0, y0, x1, y1 = box
    sub = blob[y0:y1, x0:x1]
    if sub.size == 0:
        return box
    out = list(box)
    for axis in (0, 1):  # 0: columns (left/right), 1: rows (top/bottom)
        prof = sub.sum(axis=axis).astype(np.float64)
        n = len(prof)
        peak = prof.max()
        if n < 8 or peak <= 0:
            continue
        limit = max(2, int(0.2 * n))
        for side in (0, 1):
            p = prof if side == 0 else prof[::-1]
            cut = 0
            for i in range(1, limit):
                if p[i] - p[i - 1] >= 0.3 * peak and p[:i].max() < 0.45 * peak:
                    cut = i
            if cut:
                if axis == 0:
                    if side == 0:
                        out[0] = x0 + cut
                    else:
                        out[2] = x1 - cut
                else:
                    if side == 0:
                        out[1] = y0 + cut
                    else:
                        out[3] = y1 - cut
    return tuple(out)  # type: ignore[return-value]


def _refine_edges(img: np.ndarray, colours: np.ndarray, tol: int, coarse: Box, blob: np.ndarray, f: int,
                  shape: Tuple[int, int]) -> Tuple[Box, float]:
    """Place each edge at full resolution within +-(f+1) px of the coarse edge; returns box, edge contrast.

    For each side, only the rows (columns) where the coarse region actually reaches that side are
    looked at, so the thin tips of a sector count as fully as a rectangle's side.
    """
    H, W = shape
    sx0, sy0, sx1, sy1 = coarse
    X0, Y0, X1, Y1 = sx0 * f, sy0 * f, sx1 * f, sy1 * f
    if X1 >= (W // f) * f:
        X1 = W
    if Y1 >= (H // f) * f:
        Y1 = H
    m = f + 1
    contrasts = []
    result = [X0, Y0, X1, Y1]
    cache: Dict[Tuple[bool, int, int, int], float] = {}

    def line_frac(vertical: bool, line: int, lo: int, hi: int) -> float:
        key = (vertical, line, lo, hi)
        if key not in cache:
            px = img[lo:hi, line:line + 1] if vertical else img[line:line + 1, lo:hi]
            cache[key] = float((_bg_distance(px, colours) > tol).mean()) if px.size else 0.0
        return cache[key]

    for side in range(4):
        vertical = side in (0, 2)  # left/right edges are columns
        if vertical:
            edge_small = sx0 if side == 0 else sx1 - 1
            span = np.nonzero(blob[sy0:sy1, max(0, edge_small - 1):edge_small + 2].any(axis=1))[0] + sy0
            lo, hi = (span.min() * f, (span.max() + 1) * f) if span.size else (Y0, Y1)
            edge = X0 if side == 0 else X1
            limit = W
        else:
            edge_small = sy0 if side == 1 else sy1 - 1
            span = np.nonzero(blob[max(0, edge_small - 1):edge_small + 2, sx0:sx1].any(axis=0))[0] + sx0
            lo, hi = (span.min() * f, (span.max() + 1) * f) if span.size else (X0, X1)
            edge = Y0 if side == 1 else Y1
            limit = H
        hi = min(hi, H if vertical else W)
        outward = -1 if side in (0, 1) else 1
        # candidate lines, outermost first; index = first pixel line inside the image
        if outward < 0:
            cands = list(range(max(0, edge - m), min(limit, edge + m + 1)))
        else:
            cands = list(range(min(limit, edge + m), max(0, edge - m) - 1, -1))
        ref_line = edge + (-outward) * (m + 1) + (0 if outward < 0 else -1)
        ref_line = int(np.clip(ref_line, 0, limit - 1))

        def frac(line: int, vertical=vertical, lo=lo, hi=hi) -> float:
            return line_frac(vertical, line, lo, hi)

        ref = frac(ref_line)
        chosen = None
        for line in cands:
            if outward < 0:
                ok = 0 <= line < limit and frac(line) >= max(0.1, 0.5 * ref)
            else:
                ok = 0 <= line - 1 < limit and frac(line - 1) >= max(0.1, 0.5 * ref)
            if ok:
                chosen = line
                break
        if chosen is None:
            chosen = edge
        result[side] = chosen
        # contrast: content fraction just inside vs just outside the chosen edge
        if outward < 0:
            inside = frac(min(limit - 1, chosen + 1))
            outside = frac(chosen - 2) if chosen - 2 >= 0 else 0.0
        else:
            inside = frac(max(0, chosen - 2))
            outside = frac(chosen + 1) if chosen + 1 < limit else 0.0
        contrasts.append(max(0.0, inside - outside) / max(inside, 1e-6) if inside > 0 else 0.0)
    x0, y0, x1, y1 = result
    return (int(x0), int(y0), int(x1), int(y1)), float(np.mean(contrasts))


def find_image_region(frame_rgb: np.ndarray) -> CropResult:
    """Locate the ultrasound image in ``frame_rgb`` (HxW or HxWx3); see the module docstring.

    Returns ``CropResult(box, confidence, reason)``; ``box`` is None when the frame is refused.
    An already-cropped frame (no workspace border) gives the whole frame.
    """
    try:
        img = _as_rgb_uint8(frame_rgb)
    except ValueError as e:
        return _refuse(f"not an image: {e}")
    H, W = img.shape[:2]
    if H < 16 or W < 16:
        return _refuse(f"frame is {W}x{H}, too small to hold an ultrasound image")
    f = max(1, int(round(max(H, W) / ANALYSIS_SIZE)))
    hs, ws = H // f, W // f
    small = img if f == 1 else cv2.resize(img[: hs * f, : ws * f], (ws, hs), interpolation=cv2.INTER_AREA)
    k3 = np.ones((3, 3), np.uint8)
    rng = (cv2.dilate(small, k3) - cv2.erode(small, k3)).max(axis=2)

    border = max(1, int(round(0.015 * min(hs, ws))))
    colours, covered = _background_colours(small, rng, border)
    if covered < 0.3:
        return CropResult((0, 0, W, H), 0.6, "no flat workspace around the frame border: frame looks already "
                          "cropped, whole frame kept")
    d = _bg_distance(small, colours)
    # noise tolerance: how far the border's near-background pixels stray from the background colours
    ring = np.zeros((hs, ws), bool)
    ring[:border] = ring[-border:] = True
    ring[:, :border] = ring[:, -border:] = True
    near = d[ring & (d <= 12)]
    tol = int(min(10, np.percentile(near, 99))) if near.size else 0
    content = (d > tol).astype(np.uint8)
    if content.mean() < 0.01:
        return _refuse("blank frame: almost nothing differs from the background (no image found)")

    # solid regions: dense content, then an opening that drops strokes thinner than k (text, ticks)
    k = _odd(max(3, 0.025 * min(hs, ws)))
    dens = cv2.blur(content.astype(np.float32), (k, k))
    solid = (dens >= 0.5).astype(np.uint8)
    solid = cv2.morphologyEx(solid, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, (k, k)))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(solid, connectivity=8)
    if n <= 1:
        return _refuse("no solid image-like region (only thin marks, text or noise differ from the background)")
    areas = stats[1:, cv2.CC_STAT_AREA].astype(np.float64)
    order = np.argsort(-areas) + 1
    main = int(order[0])
    frame_area = float(hs * ws)
    if areas[main - 1] < 0.02 * frame_area:
        return _refuse(f"largest candidate region covers only {100 * areas[main - 1] / frame_area:.1f}% of the "
                       "frame (blank or very dark frame?)")

    def bbox(i: int) -> Box:
        x, y, w, h = stats[i, :4]
        return int(x), int(y), int(x + w), int(y + h)

    bx = list(bbox(main))
    members = [main]
    rival = 0.0
    # merge large neighbours (split-screen panes, a Doppler box separated by a line); remember rivals
    gap = 2 * k
    for i in order[1:]:
        i = int(i)
        a = areas[i - 1]
        if a < 0.05 * areas[main - 1]:
            break
        x0, y0, x1, y1 = bbox(i)
        touches = x0 <= bx[2] + gap and x1 >= bx[0] - gap and y0 <= bx[3] + gap and y1 >= bx[1] - gap
        aligned = (min(y1, bx[3]) - max(y0, bx[1])) > 0.6 * min(y1 - y0, bx[3] - bx[1]) or \
                  (min(x1, bx[2]) - max(x0, bx[0])) > 0.6 * min(x1 - x0, bx[2] - bx[0])
        if touches and aligned and a >= 0.15 * areas[main - 1]:
            members.append(i)
            bx = [min(bx[0], x0), min(bx[1], y0), max(bx[2], x1), max(bx[3], y1)]
        else:
            rival = max(rival, a)
    blob = np.isin(labels, members)
    area = float(blob.sum())
    dominance = 1.0 - rival / (area + rival)
    if dominance < 0.6:
        return _refuse(f"ambiguous: two candidate image regions of similar size ({dominance:.2f} dominance)",
                       dominance)
    coarse = _trim_protrusions(blob.astype(np.uint8), tuple(bx))
    cx0, cy0, cx1, cy1 = coarse
    if coarse != tuple(bx):
        clipped = np.zeros_like(blob)
        clipped[cy0:cy1, cx0:cx1] = blob[cy0:cy1, cx0:cx1]
        blob = clipped
    # texture: real images have speckle; flat panels (a coloured header bar) do not
    textured = float((rng[blob] > max(2, tol)).mean()) if area else 0.0
    fill = area / max(1.0, float((cx1 - cx0) * (cy1 - cy0)))
    if textured < 0.03:
        return _refuse(f"candidate region is flat (textured fraction {textured:.3f}): a panel, not an image",
                       textured)
    if fill < 0.3:
        return _refuse(f"candidate region fills only {fill:.2f} of its box (not a rectangle or sector)", fill)

    # full-resolution refinement near the coarse edges
    box, contrast = _refine_edges(img, colours, tol, coarse, blob, f, (H, W))
    x0, y0, x1, y1 = box
    if x1 - x0 < 8 or y1 - y0 < 8:
        return _refuse("candidate region collapsed during refinement")
    conf = float(min(1.0, 0.35 + 0.65 * contrast) * min(1.0, dominance / 0.9) * min(1.0, textured / 0.15 + 0.5))
    conf = float(np.clip(conf, 0.0, 1.0))
    if (x1 - x0) * (y1 - y0) >= 0.97 * W * H:
        return CropResult((0, 0, W, H), max(conf, 0.6), "image fills the frame (already cropped): whole frame kept")
    if conf < MIN_CONFIDENCE:
        return _refuse(f"image edges unclear (edge contrast {contrast:.2f}, dominance {dominance:.2f}, "
                       f"texture {textured:.2f})", conf)
    kind = "sector" if fill < 0.85 else "rectangle"
    return CropResult(box, conf, f"cropped {kind} image region")


def apply_crop(frame: np.ndarray, box: Optional[Sequence[int]]) -> np.ndarray:
    """Return ``frame[y0:y1, x0:x1]`` (a copy); ``None`` returns the frame unchanged."""
    if box is None:
        return frame
    x0, y0, x1, y1 = (int(v) for v in box)
    h, w = frame.shape[:2]
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ValueError(f"crop box {list(box)} does not fit a {w}x{h} frame")
    return np.ascontiguousarray(frame[y0:y1, x0:x1])


def suppress_marks(image_rgb: np.ndarray, radius: int = 3) -> Tuple[np.ndarray, int]:
    """Inpaint burned-in marks (calipers, text, colour marks) inside a cropped image.

    Marks are thin and either saturated colour or near-pure white standing out from their
    neighbourhood; ultrasound speckle is grey and rarely saturated over a thin line. Returns the
    cleaned image and how many pixels changed, so a report can show what was touched.
    """
    img = _as_rgb_uint8(image_rgb)
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    sat = (hsv[:, :, 1] > 80) & (hsv[:, :, 2] > 60)
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    # white strokes: very bright and much brighter than the local median (speckle highlights are blobs)
    med = cv2.medianBlur(gray, 7)
    white = (gray >= 235) & (gray.astype(np.int16) - med.astype(np.int16) > 60)
    mask = (sat | white).astype(np.uint8)
    if not mask.any():
        return img.copy(), 0
    mask = cv2.dilate(mask, np.ones((3, 3), np.uint8))
    out = cv2.inpaint(img, mask * 255, radius, cv2.INPAINT_TELEA)
    changed = int(np.any(out != img, axis=2).sum())
    return out, changed
