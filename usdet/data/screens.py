"""Synthetic scanner screens with a known image region, to test and benchmark the cropper.

Real exports cannot be shared, so tests draw the workspace around an ultrasound image (a real
BUSI image or a phantom): a canvas of varied size, dark or grey GUI, header text (with a planted
patient name if asked), parameter panel, body-marker pictogram, depth scale whose ticks touch the
image, grey bar, TGC curve, logo, orientation mark close to the image, colour Doppler box and
calipers inside it. The image is a rectangle (linear probe) or a fan (curvilinear/phased probe)
at a random position; ``Screen.box`` is its true bounding box, x1/y1 exclusive. ``dual`` draws two
images side by side (or stacked) split by a line or a gap, as breast exams often show two planes;
``Screen.views`` then holds each image's true box and ``Screen.lesion_views`` the view of each lesion.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

__all__ = ["Screen", "make_screen", "synthetic_ultrasound", "PARAMETER_LINES"]

Box = Tuple[int, int, int, int]
FONT = cv2.FONT_HERSHEY_SIMPLEX
PARAMETER_LINES = ("Gen", "L12-5", "C5-1", "28Hz", "4.0cm", "2D", "Gn 60", "C 61", "3/3/4", "HPen", "P Low",
                   "DR 65", "FR 31", "MI 1.1", "TIS 0.4")


@dataclass
class Screen:
    """A drawn scanner frame: ``frame`` (HxWx3 uint8 RGB), true image ``box``, mapped ``lesion_boxes``."""

    frame: np.ndarray
    box: Box
    lesion_boxes: List[Box] = field(default_factory=list)
    info: Dict[str, object] = field(default_factory=dict)
    views: List[Box] = field(default_factory=list)  # dual-view screens: each image's box, reading order
    lesion_views: List[int] = field(default_factory=list)  # dual-view screens: the view of each lesion box


def synthetic_ultrasound(rng: np.random.Generator, h: int, w: int) -> Tuple[np.ndarray, List[Box]]:
    """A speckled breast-like image (HxW uint8 gray) with 0-2 hypoechoic lesions and their boxes."""
    from .phantom import render_phantom

    rgb, boxes, _ = render_phantom(rng, (h, w))
    out = []
    for x, y, bw, bh in boxes:
        out.append((int(x), int(y), int(round(x + bw)), int(round(y + bh))))
    return rgb[:, :, 0].copy(), out


def _text(img, s, org, scale, colour, thick=1):
    cv2.putText(img, s, (int(org[0]), int(org[1])), FONT, scale, tuple(int(c) for c in colour), thick, cv2.LINE_AA)


def _fan_mask(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Sector mask filling an h x w box: apex above, straight sides, arcs top (convex probe) and bottom."""
    half = np.deg2rad(rng.uniform(28, 45))
    r0 = 0.0 if rng.random() < 0.35 else rng.uniform(0.15, 0.4)  # 0 = phased array (pointed apex)
    xmax = np.sin(half)
    ymin = r0 * np.cos(half)
    xs = np.linspace(-xmax, xmax, w, dtype=np.float32)[None, :]
    ys = np.linspace(ymin, 1.0, h, dtype=np.float32)[:, None]
    r = np.sqrt(xs * xs + ys * ys)
    ang = np.abs(np.arctan2(xs, ys))
    # tiny tolerance so the extreme rows/columns (which touch the box) are inside
    return (r >= r0 - 1e-4) & (r <= 1.0 + 1e-4) & (ang <= half + 1e-4)


def make_screen(
    rng: np.random.Generator,
    image: Optional[np.ndarray] = None,
    lesion_boxes: Sequence[Box] = (),
    *,
    probe: Optional[str] = None,
    theme: Optional[str] = None,
    canvas: Optional[Tuple[int, int]] = None,
    gain: Optional[float] = None,
    doppler: Optional[bool] = None,
    jpeg_quality: Optional[int] = None,
    header_text: Optional[str] = None,
    already_cropped: bool = False,
    dual: Optional[str] = None,
) -> Screen:
    """Draw one scanner screen around ``image`` (gray or RGB; a phantom if None).

    Unset options are drawn at random: ``probe`` "linear"/"sector", ``theme`` "dark"/"grey",
    ``canvas`` (W, H), ``gain`` (image brightness factor; < 0.35 gives a very dark frame),
    ``doppler`` (colour box inside the image), ``jpeg_quality`` (None = lossless).
    ``lesion_boxes`` ([x0, y0, x1, y1] in ``image`` pixels) are mapped into the screen.
    ``dual`` "side" / "stacked": two linear images (``image`` and a phantom) split by a divider.
    """
    if image is None:
        ih, iw = int(rng.integers(220, 360)), int(rng.integers(260, 420))
        image, lesion_boxes = synthetic_ultrasound(rng, ih, iw)
    img = np.asarray(image)
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    ih, iw = img.shape[:2]
    probe = probe or ("sector" if rng.random() < 0.4 else "linear")
    theme = theme or ("grey" if rng.random() < 0.35 else "dark")
    gain = float(gain if gain is not None else (rng.uniform(0.15, 0.35) if rng.random() < 0.25 else rng.uniform(0.8, 1.2)))
    doppler = bool(doppler if doppler is not None else rng.random() < 0.25)
    if dual not in (None, "side", "stacked"):
        raise ValueError(f"dual must be None, 'side' or 'stacked', got {dual!r}")
    if dual:
        probe, doppler = "linear", False

    if already_cropped:
        W, H = iw, ih
        frame_gray = np.clip(img.astype(np.float32) * gain, 0, 255).astype(np.uint8)
        frame = np.repeat(frame_gray[:, :, None], 3, axis=2)
        return Screen(frame, (0, 0, W, H), [tuple(int(v) for v in b) for b in lesion_boxes],
                      {"probe": "linear", "theme": "none", "gain": gain, "already_cropped": True})

    W, H = canvas if canvas is not None else (int(rng.integers(640, 1281)), int(rng.integers(480, 1025)))
    if theme == "dark":
        bg = np.array([int(rng.integers(0, 12))] * 3)
        fg = np.array([230, 230, 230])
    else:
        g = int(rng.integers(55, 150))
        tint = rng.integers(-6, 7, 3) if rng.random() < 0.5 else np.zeros(3, int)
        bg = np.clip(g + tint, 0, 255)
        fg = np.array([255, 255, 255]) if g < 110 else np.array([10, 10, 10])
    frame = np.empty((H, W, 3), np.uint8)
    frame[:] = bg
    header_h = int(H * rng.uniform(0.06, 0.1))
    if rng.random() < 0.5:  # coloured title bar (Philips-style)
        frame[:header_h] = (int(rng.integers(20, 60)), int(rng.integers(50, 90)), int(rng.integers(100, 160)))
    panel_w = int(W * rng.uniform(0.1, 0.16))
    right_w = int(W * rng.uniform(0.08, 0.12))
    bottom_h = int(H * rng.uniform(0.08, 0.14))
    # image size and position inside the free area
    free_w, free_h = W - panel_w - right_w, H - header_h - bottom_h
    aspect = iw / ih * {None: 1.0, "side": 2.0, "stacked": 0.5}[dual]
    rh = int(free_h * rng.uniform(0.7, 0.97))
    rw = int(rh * aspect * (1.0 if probe == "linear" else rng.uniform(1.1, 1.5)))
    if rw > free_w * 0.97:
        rw = int(free_w * rng.uniform(0.8, 0.97))
        rh = min(rh, int(rw / aspect)) if probe == "linear" else rh
    rw, rh = max(64, rw), max(64, rh)
    x0 = panel_w + int(rng.integers(0, max(1, free_w - rw)))
    y0 = header_h + int(rng.integers(4, max(5, free_h - rh)))
    x0 = min(x0, W - rw - 2)
    y0 = min(y0, H - rh - 2)
    if dual:
        us_rgb, views, panes = _dual_image(rng, img, lesion_boxes, rw, rh, dual, gain, bg)
    else:
        us_rgb, views, panes = _scaled(img, rw, rh, gain), [], [(0, 0, rw, rh, iw, ih, list(lesion_boxes))]
    if doppler:
        dw, dh = int(rw * rng.uniform(0.25, 0.45)), int(rh * rng.uniform(0.25, 0.45))
        dx, dy = int(rng.integers(0, rw - dw)), int(rng.integers(0, rh - dh))
        blobs = cv2.GaussianBlur(rng.random((dh, dw)).astype(np.float32), (0, 0), 4)
        flow = blobs > np.quantile(blobs, 0.7)
        colour = np.array([230, 40, 20]) if rng.random() < 0.5 else np.array([30, 80, 240])
        region = us_rgb[dy:dy + dh, dx:dx + dw]
        region[flow] = colour
        cv2.rectangle(us_rgb, (dx, dy), (dx + dw - 1, dy + dh - 1), (200, 200, 200), 1)
    if probe == "sector":
        mask = _fan_mask(rh, rw, rng)
        target = frame[y0:y0 + rh, x0:x0 + rw]
        target[mask] = us_rgb[mask]
    else:
        frame[y0:y0 + rh, x0:x0 + rw] = us_rgb
    box = (x0, y0, x0 + rw, y0 + rh)
    # calipers and measurement text inside the image
    for _ in range(int(rng.integers(0, 3))):
        cx, cy = x0 + int(rng.integers(rw // 4, 3 * rw // 4)), y0 + int(rng.integers(rh // 4, 3 * rh // 4))
        cv2.drawMarker(frame, (cx, cy), (255, 255, 255), cv2.MARKER_CROSS, 9, 1)
    mapped, lesion_views = [], []
    for k, (ox, oy, pw, ph, sw, sh, pane_boxes) in enumerate(panes):
        sx, sy = pw / sw, ph / sh
        for bx0, by0, bx1, by1 in pane_boxes:
            lx0, ly0 = int(np.floor(bx0 * sx)), int(np.floor(by0 * sy))
            lx1, ly1 = min(pw, int(np.ceil(bx1 * sx))), min(ph, int(np.ceil(by1 * sy)))
            if probe == "sector":  # only the part inside the fan is visible
                ys_, xs_ = np.nonzero(mask[ly0:ly1, lx0:lx1])
                if not ys_.size:
                    continue
                lx0, ly0, lx1, ly1 = lx0 + xs_.min(), ly0 + ys_.min(), lx0 + xs_.max() + 1, ly0 + ys_.max() + 1
            mapped.append((x0 + ox + int(lx0), y0 + oy + int(ly0), x0 + ox + int(lx1), y0 + oy + int(ly1)))
            lesion_views.append(k)

    # ---- workspace around the image ----
    tcol = fg
    s = rng.uniform(0.4, 0.6) * (H / 768) ** 0.5
    name = header_text if header_text is not None else "DOE^JANE"
    _text(frame, name, (10, header_h * 0.45), s * 1.1, tcol if frame[2, W // 2].sum() < 300 else (0, 0, 0))
    _text(frame, f"ID {int(rng.integers(10**6, 10**7))}  BREAST LT", (10, header_h * 0.9), s, tcol)
    _text(frame, "GENERAL HOSPITAL", (W * 0.4, header_h * 0.45), s, tcol)
    _text(frame, "MI 1.1  TIS 0.4   27/11/2026 10:21", (W * 0.62, header_h * 0.8), s, tcol)
    # logo
    if rng.random() < 0.6:
        cv2.rectangle(frame, (W - 90, 4), (W - 10, max(12, header_h - 6)), (60, 90, 160), -1)
        _text(frame, "LOGO", (W - 84, header_h * 0.7), s, (255, 255, 255), 2)
    # parameter panel
    y = header_h + 20
    for line in rng.choice(PARAMETER_LINES, size=int(rng.integers(5, 11)), replace=False):
        _text(frame, str(line), (8, y), s, tcol)
        y += int(22 * s / 0.5)
    # body-marker pictogram
    bmx, bmy = int(panel_w * 0.5), int(H - bottom_h * 0.6 - 40)
    cv2.circle(frame, (bmx, bmy), 22, tuple(int(c) for c in tcol), 1, cv2.LINE_AA)
    cv2.circle(frame, (bmx, bmy), 3, tuple(int(c) for c in tcol), -1)
    cv2.line(frame, (bmx - 14, bmy + 10), (bmx + 4, bmy - 8), (240, 200, 40), 3)
    # depth scale: ticks touching the image's right (or left) edge, numbers beside them
    side_right = rng.random() < 0.7
    # linear: ticks touch the image; sector: the scale stands beside the fan's bounding box
    scale_gap = 0 if probe == "linear" else int(rng.integers(8, 20))
    edge_x = x0 + rw + scale_gap if side_right else x0 - 1 - scale_gap
    step = int(rh / rng.uniform(5, 9))
    direction = 1 if side_right else -1
    for i, ty in enumerate(range(y0, y0 + rh, step)):
        length = 10 if i % 2 == 0 else 6
        cv2.line(frame, (edge_x, ty), (edge_x + direction * length, ty), tuple(int(c) for c in tcol), 2)
        if i % 2 == 0 and i > 0:
            _text(frame, str(i // 2), (edge_x + direction * 14 - (0 if side_right else 12), ty + 5), s * 0.8, tcol)
    # orientation mark close to the image's top-left corner (2-6 px gap)
    gap = int(rng.integers(2, 7))
    cv2.circle(frame, (x0 - gap - 8, y0 + 10), 7, (80, 120, 220), -1, cv2.LINE_AA)
    # text just under the image
    text_h = cv2.getTextSize("LT", FONT, s, 1)[0][1]
    text_y = y0 + rh + text_h + int(rng.integers(3, 8) if probe == "linear" else rng.integers(12, 20))
    if text_y + 4 < H:
        _text(frame, "LT BREAST 2 O'CLOCK", (x0 + rw * 0.3, text_y), s, tcol)
    # grey bar with a gap from the image (on the side away from the scale if room)
    bar_w = int(rng.integers(10, 22))
    bar_h = int(rh * rng.uniform(0.35, 0.6))
    bar_x = min(W - bar_w - 4, x0 + rw + int(rng.integers(40, 60))) if side_right else \
        max(4, x0 - int(rng.integers(40, 60)) - bar_w)
    ramp = np.linspace(255, 0, bar_h).astype(np.uint8)
    frame[y0:y0 + bar_h, bar_x:bar_x + bar_w] = ramp[:, None, None]
    # TGC curve on the far right
    ys = np.linspace(y0, y0 + rh, 12)
    xs = W - right_w * 0.5 + rng.uniform(-8, 8, ys.size)
    pts = np.stack([xs, ys], 1).astype(np.int32)
    cv2.polylines(frame, [pts], False, tuple(int(c) for c in tcol), 1, cv2.LINE_AA)
    if doppler:  # colour scale beside the image
        cbx = max(2, x0 - 30)
        for i in range(40):
            c = (int(255 - 6 * i), 30, int(6 * i))
            frame[y0 + 20 + 2 * i:y0 + 22 + 2 * i, cbx:cbx + 10] = c
    info = {"probe": probe, "theme": theme, "gain": gain, "doppler": doppler, "canvas": (W, H), "dual": dual}
    if jpeg_quality is None and rng.random() < 0.3:
        jpeg_quality = int(rng.integers(80, 96))
    if jpeg_quality:
        ok, buf = cv2.imencode(".jpg", frame[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
        frame = cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1].copy()
        info["jpeg_quality"] = int(jpeg_quality)
    views = [(x0 + a, y0 + b, x0 + c, y0 + d) for a, b, c, d in views]
    return Screen(frame, box, mapped, info, views, lesion_views if dual else [])


def _scaled(img: np.ndarray, w: int, h: int, gain: float) -> np.ndarray:
    """``img`` (gray) resized to w x h with the screen's gain, as RGB."""
    ih, iw = img.shape[:2]
    scaled = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if w < iw else cv2.INTER_LINEAR)
    us = np.clip(scaled.astype(np.float32) * gain, 0, 255).astype(np.uint8)
    return np.repeat(us[:, :, None], 3, axis=2)


def _dual_image(rng: np.random.Generator, img: np.ndarray, lesion_boxes: Sequence[Box], rw: int, rh: int,
                layout: str, gain: float, bg: np.ndarray):
    """Two images in an rw x rh region split by a 1-3 px divider (a grey or white line, or a gap of
    workspace); the second view is a phantom, sometimes shallower (its depth differs).

    Returns the region (RGB), the views' boxes in region pixels, and per view
    ``(x, y, w, h, source w, source h, lesion boxes in source pixels)`` for mapping lesions."""
    ih, iw = img.shape[:2]
    img2, boxes2 = synthetic_ultrasound(rng, ih, iw)
    div = int(rng.integers(1, 4))
    kind = rng.choice(["gap", "grey", "white"])
    colour = bg if kind == "gap" else (np.array([int(rng.integers(90, 200))] * 3) if kind == "grey"
                                       else np.array([255, 255, 255]))
    region = np.empty((rh, rw, 3), np.uint8)
    region[:] = bg
    if layout == "side":
        w0 = (rw - div) // 2
        sizes = [(0, 0, w0, rh), (w0 + div, 0, rw - w0 - div, rh)]
        region[:, w0:w0 + div] = colour
        if rng.random() < 0.3:  # a shallower second view: workspace below it
            sizes[1] = (w0 + div, 0, rw - w0 - div, int(rh * rng.uniform(0.75, 0.95)))
    else:
        h0 = (rh - div) // 2
        sizes = [(0, 0, rw, h0), (0, h0 + div, rw, rh - h0 - div)]
        region[h0:h0 + div] = colour
    views, panes = [], []
    for (x, y, w, h), (im, boxes) in zip(sizes, [(img, list(lesion_boxes)), (img2, boxes2)]):
        region[y:y + h, x:x + w] = _scaled(im, w, h, gain)
        views.append((x, y, x + w, y + h))
        panes.append((x, y, w, h, iw, ih, boxes))
    return region, views, panes
