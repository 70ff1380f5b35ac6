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

__all__ = ["CropResult", "find_image_region", "apply_crop", "boxes_to_source", "suppress_marks", "ANALYSIS_SIZE"]

Box = Tuple[int, int, int, int]

#: longest side of the downscaled analysis image
ANALYSIS_SIZE = 320
#: confidence below which a candidate is refused
MIN_CONFIDENCE = 0.5
#: a region whose median level is under this many times the compression noise counts as dim...
DIM_LOSSY_LEVEL = 2.5
#: ...and is cropped only with at least this confidence and every edge at least this contrast
DIM_LOSSY_MIN_CONFIDENCE = 0.75
DIM_LOSSY_MIN_EDGE_CONTRAST = 0.35


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


def _noise_tolerance(img: np.ndarray, colours: np.ndarray, border: int) -> Tuple[int, int]:
    """How far background pixels stray from the background colours (0 for lossless exports).

    Lossless screens are exact: only antialiased strokes leave a few small deviations, so any
    difference is content (a sector drawn at grey level 1 on black counts). JPEG leaves ringing
    around every edge: many small deviations compared with the real strokes, measured on the
    frame border; then the tolerance is set above that ringing. Returns the colour tolerance
    and the local-range (texture) tolerance.
    """
    ring = np.concatenate([img[:border].reshape(-1, 3), img[-border:].reshape(-1, 3),
                           img[border:-border, :border].reshape(-1, 3), img[border:-border, -border:].reshape(-1, 3)])
    d = _bg_distance(ring[:, None, :], colours).ravel()
    small = int(((d >= 1) & (d <= 6)).sum())
    big = int((d > 6).sum())
    if small < max(20, 0.3 * big):
        return 0, 255  # exact colours: the texture term is not needed
    near = d[(d > 0) & (d <= 20)]
    tol = int(min(20, np.percentile(near, 90))) if near.size else 0
    strips = [img[:border], img[-border:], img[:, :border], img[:, -border:]]
    rng = np.concatenate([_local_dev(st)[2:-2, 2:-2].ravel() for st in strips])
    dist = np.concatenate([_bg_distance(np.ascontiguousarray(st), colours)[2:-2, 2:-2].ravel() for st in strips])
    quiet = rng[dist <= tol]
    tol_rng = int(min(40, np.percentile(quiet, 99))) if quiet.size else 2 * tol
    return tol, max(tol_rng, tol)


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
        limit = max(2, int(0.4 * n))
        for side in (0, 1):
            p = prof if side == 0 else prof[::-1]
            cut = 0
            for i in range(1, limit):
                if p[i] - p[max(0, i - 3)] >= 0.3 * peak and p[:i].max() < 0.45 * peak:
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


def _local_dev(img: np.ndarray) -> np.ndarray:
    """|grey - 5x5 median|: speckle deviates from its neighbourhood; flat workspace does not, and
    unlike a local range it does not thicken thin strokes (their neighbours sit at the median)."""
    g = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)
    return cv2.absdiff(g, cv2.medianBlur(g, 5))


def _content_mask(img: np.ndarray, colours: np.ndarray, tol: int, tol_rng: int) -> np.ndarray:
    """uint8 mask (0/1): pixels farther than ``tol`` from every background colour, or textured.

    The texture term keeps image pixels whose grey level happens to equal a grey workspace.
    """
    bg = None
    for c in colours:
        lo = tuple(int(max(0, v - tol)) for v in c)
        hi = tuple(int(min(255, v + tol)) for v in c)
        m = cv2.inRange(img, lo, hi)
        bg = m if bg is None else cv2.bitwise_or(bg, m)
    if tol_rng >= 255:
        return (bg == 0).view(np.uint8)
    return ((bg == 0) | (_local_dev(img) > tol_rng)).view(np.uint8)


def _refine_side(img: np.ndarray, colours: np.ndarray, tol: Tuple[int, int], blob_core: np.ndarray, f: int,
                 coarse_full: Box, side: int, reach: int) -> Tuple[int, float]:
    """Place one edge (0 left, 1 top, 2 right, 3 bottom) at full resolution.

    Works on a strip around the coarse edge: the solid core of the region (``blob_core``, the
    eroded analysis-scale blob) is grown through connected content at most ``reach`` px, giving
    back fan tips and corners the opening shaved off. Marks touching the image (scale ticks)
    grow with it, so if the side is straight (a pixel line with high content coverage along the
    region's extent) the outermost well-covered line wins over thinly covered lines beyond it.
    Returns the edge coordinate (exclusive for right/bottom) and the edge contrast (0..1).
    """
    H, W = img.shape[:2]
    X0, Y0, X1, Y1 = coarse_full
    depth = reach + 2 * f + 2
    if side == 0:
        x0, x1, y0, y1 = max(0, X0 - reach), min(W, X0 + depth), max(0, Y0 - reach), min(H, Y1 + reach)
    elif side == 2:
        x0, x1, y0, y1 = max(0, X1 - depth), min(W, X1 + reach), max(0, Y0 - reach), min(H, Y1 + reach)
    elif side == 1:
        x0, x1, y0, y1 = max(0, X0 - reach), min(W, X1 + reach), max(0, Y0 - reach), min(H, Y0 + depth)
    else:
        x0, x1, y0, y1 = max(0, X0 - reach), min(W, X1 + reach), max(0, Y1 - depth), min(H, Y1 + reach)
    hs, ws = blob_core.shape
    ys = np.minimum(np.arange(y0, y1) // f, hs - 1)
    xs = np.minimum(np.arange(x0, x1) // f, ws - 1)
    cont = _content_mask(img[y0:y1, x0:x1], colours, *tol)
    # grow only through content in dense neighbourhoods: speckle is dense, strokes of text, ticks
    # and lines (<= 3 px wide) are not, so marks close to the image are not annexed through them
    dens = cv2.blur(cont * np.uint8(255), (7, 7))
    grow = ((dens >= 128) & (cont > 0)).view(np.uint8)
    seed = blob_core[np.ix_(ys, xs)] & grow
    fallback = (X0, Y0, X1, Y1)[side]
    if not seed.any():
        return fallback, 0.0
    allowed = grow & cv2.dilate(seed, np.ones((2 * reach + 1, 2 * reach + 1), np.uint8))
    nlab, lab = cv2.connectedComponents(allowed, connectivity=8)
    keep = np.bincount(lab[seed > 0].ravel(), minlength=nlab)
    keep[0] = 0
    region = (keep > 0)[lab]
    vertical = side in (0, 2)
    if not vertical:  # work on columns in both cases
        cont, region = cont.T, region.T
    c0, c1 = (max(0, Y0 - y0), max(0, Y1 - y0)) if vertical else (max(0, X0 - x0), max(0, X1 - x0))
    prof = cont[c0:c1].mean(axis=0)  # coverage of each pixel line along the region's coarse extent
    present = np.nonzero(region.any(axis=0))[0]
    n = len(prof)
    step = 1 if side in (0, 1) else -1  # inward direction
    edge = int(present.min()) if step > 0 else int(present.max())
    start = int(np.clip(edge - 3 * step, 0, n - 1))
    lines = list(range(start, n if step > 0 else -1, step))[: depth + reach]
    cov = prof[lines]
    best = float(cov.max()) if cov.size else 0.0
    if best >= 0.5:  # straight side
        chosen = lines[int(np.nonzero(cov >= 0.6 * best)[0][0])]
    else:  # fan tip / rounded side: follow raw content outward a few px from the dense region's tip
        chosen = edge
        rows = np.nonzero(region[:, edge])[0]
        lo, hi = (int(rows.min()), int(rows.max()) + 1) if rows.size else (0, cont.shape[0])
        for _ in range(4):
            nxt = chosen - step
            if not 0 <= nxt < n:
                break
            hit = np.nonzero(cont[max(0, lo - 2):hi + 2, nxt])[0]
            if hit.size == 0:
                break
            chosen = nxt
            lo, hi = max(0, lo - 2) + int(hit.min()), max(0, lo - 2) + int(hit.max()) + 1
        chosen = int(np.clip(chosen - step, 0, n - 1))  # a fan's last tip pixel is faint: keep a 1 px margin
    inside = float(prof[int(np.clip(chosen + 2 * step, 0, n - 1))])
    o = chosen - 2 * step
    outside = float(prof[o]) if 0 <= o < n else 0.0
    contrast = max(0.0, inside - outside) / inside if inside > 0 else 0.0
    offset = x0 if vertical else y0
    return chosen + offset + (0 if side in (0, 1) else 1), contrast


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
    tol, tol_rng = _noise_tolerance(img, colours, max(3, border * f))
    content = (d > tol).astype(np.uint8)
    if tol_rng < 255:
        content |= (_local_dev(small) > tol_rng).view(np.uint8)
    if content.mean() < 0.01:
        return _refuse("blank frame: almost nothing differs from the background (no image found)")

    # solid regions: dense content, then an opening that drops strokes thinner than k (text, ticks)
    k = _odd(max(3, 0.025 * min(hs, ws)))
    closed = cv2.morphologyEx(content, cv2.MORPH_CLOSE, k3)  # fill speckle holes of dark images
    solid = cv2.morphologyEx(closed, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, (k, k)))
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
    bx0, by0, bx1, by1 = bx
    coarse = _trim_protrusions(blob.astype(np.uint8), (bx0, by0, bx1, by1))
    if coarse != (bx0, by0, bx1, by1):
        clipped = np.zeros_like(blob)
        clipped[coarse[1]:coarse[3], coarse[0]:coarse[2]] = blob[coarse[1]:coarse[3], coarse[0]:coarse[2]]
        blob = clipped
    cx0, cy0, cx1, cy1 = coarse
    # texture: real images have speckle; flat panels (a coloured header bar) do not
    textured = float((rng[blob] > max(2, tol)).mean()) if area else 0.0
    fill = float(blob.sum()) / max(1.0, float((cx1 - cx0) * (cy1 - cy0)))
    # dim images exported lossy: their dark parts sink into the JPEG tolerance, so the region
    # found may be only the brighter part of the image
    level = float(np.median(d[blob])) if area else 0.0
    if tol > 0 and level < 1.6 * tol:
        return _refuse(f"image too dim for its compression noise (median level {level:.0f} vs noise {tol}): its "
                       "dark parts cannot be told from the background", 0.3)
    if textured < 0.03:
        return _refuse(f"candidate region is flat (textured fraction {textured:.3f}): a panel, not an image",
                       textured)
    if fill < 0.3:
        return _refuse(f"candidate region fills only {fill:.2f} of its box (not a rectangle or sector)", fill)

    # full resolution, one strip per side: give back what the opening shaved off, place the edge
    reach = (k + 1) * f
    coarse_full = (cx0 * f, cy0 * f, W if cx1 >= ws else cx1 * f, H if cy1 >= hs else cy1 * f)
    blob_core = cv2.erode(blob.astype(np.uint8), k3)
    if not blob_core.any():
        blob_core = blob.astype(np.uint8)
    edges, contrasts = [], []
    for side in range(4):
        e, c = _refine_side(img, colours, (tol, tol_rng), blob_core, f, coarse_full, side, reach)
        edges.append(e)
        contrasts.append(c)
    contrast = float(np.mean(contrasts))
    # never cut into the solid core found at analysis scale
    core = (cx0 * f + f, cy0 * f + f, min(W, cx1 * f - f), min(H, cy1 * f - f))
    box = (min(edges[0], core[0]), min(edges[1], core[1]), max(edges[2], core[2]), max(edges[3], core[3]))
    x0, y0, x1, y1 = box
    if x1 - x0 < 8 or y1 - y0 < 8:
        return _refuse("candidate region collapsed during refinement")
    conf = float(min(1.0, 0.35 + 0.65 * contrast) * min(1.0, dominance / 0.9) * min(1.0, textured / 0.15 + 0.5))
    conf = float(np.clip(conf, 0.0, 1.0))
    if (x1 - x0) * (y1 - y0) >= 0.97 * W * H:
        return CropResult((0, 0, W, H), max(conf, 0.6), "image fills the frame (already cropped): whole frame kept")
    # a dim lossy image whose level is still near the compression noise: its faint edges were
    # placed by guesswork (wrong crops had confidence 0.6-0.9 and one edge of contrast < 0.35): demand more
    if tol > 0 and level < DIM_LOSSY_LEVEL * tol and (conf < DIM_LOSSY_MIN_CONFIDENCE
                                                       or min(contrasts) < DIM_LOSSY_MIN_EDGE_CONTRAST):
        return _refuse(f"dim image near its compression noise (median level {level:.0f} vs noise {tol}) with "
                       f"unclear edges (confidence {conf:.2f}, weakest edge contrast {min(contrasts):.2f})",
                       min(conf, MIN_CONFIDENCE - 0.01))
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


def boxes_to_source(boxes_xyxy: Sequence[Sequence[float]], crop_box: Optional[Sequence[float]],
                    image_size: Optional[Tuple[float, float]] = None) -> np.ndarray:
    """Boxes (xyxy) of a cropped, possibly resized image mapped onto the full source frame.

    The one mapping back to the original frame (the predictor's detections, the overlays of a
    converted dataset). Box coordinates are continuous (pixel i spans [i, i+1)) and ``crop_box``
    is ``[x0, y0, x1, y1]`` with x1/y1 exclusive, so per axis source = box * crop size / image
    size + crop origin; without ``image_size`` (``(width, height)``: the image was not resized)
    that is an exact shift by (x0, y0), no +-1 (the original study's off-by-one came from mixing
    the two conventions). ``crop_box`` None returns a copy.
    """
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    if crop_box is None:
        return boxes.copy()
    x0, y0, x1, y1 = (float(v) for v in crop_box)
    if image_size is None:
        return boxes + np.array([x0, y0, x0, y0])
    fx, fy = (x1 - x0) / float(image_size[0]), (y1 - y0) / float(image_size[1])
    return boxes * np.array([fx, fy, fx, fy]) + np.array([x0, y0, x0, y0])


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
