"""Synthetic cine clips with known lesion boxes per frame: a probe sweeping over a speckled phantom.

A breast exam is a live scan; a per-frame detector fires on frames a temporal rule would reject.
Measuring that needs clips whose truth is known frame by frame, with none of a patient's data.
Each clip is a series of sweeps; in each sweep the probe slides across a wide phantom (usdet's
phantom tissue and lesions, usdet/data/phantom.py), so a lesion enters the image, stays and
leaves, and sweeps without a lesion give lesion-free stretches. Speckle decorrelates from frame
to frame (a tissue-anchored speckle field mixed with fresh speckle), the gain drifts and steps,
and the probe shakes by a pixel or two. ``screen=True`` draws every frame inside one static
scanner screen (usdet/data/screens.py; burned-in name included), optionally changing the
screen layout at a given frame. Same arguments give the same frames, and frames are rendered
one at a time (memory does not grow with the clip's length).

Truth per frame: ``boxes`` (xyxy, x1/y1 exclusive) of the lesions at least ``MIN_VISIBLE`` of
whose area is in the image, with their lesion ids; lesions less visible than that are
``partial`` (neither to be found nor a false positive); a frame with neither is lesion-free.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from usdet.data.phantom import LESION_KINDS, _lesion_polygon, _tissue, add_lesion, speckle_field

__all__ = ["SyntheticCine", "CineFrame", "MIN_VISIBLE", "write_cine_frames", "write_cine_video",
           "write_cine_dicom", "write_cine_truth", "read_cine_truth", "make_cine_clip"]

#: a lesion counts as present in a frame when at least this fraction of its area is in the image
MIN_VISIBLE = 0.5
#: rows of phantom above and below the image, room for the probe's vertical shake
_PAD = 4


@dataclass
class CineFrame:
    """One rendered frame (RGB uint8) and its truth (boxes xyxy in frame pixels)."""

    index: int
    image: np.ndarray
    boxes: List[List[float]] = field(default_factory=list)
    lesion_ids: List[int] = field(default_factory=list)
    partial_boxes: List[List[float]] = field(default_factory=list)
    partial_ids: List[int] = field(default_factory=list)
    crop_box: Optional[Tuple[int, int, int, int]] = None  # where the image is (screen clips)

    @property
    def lesion_free(self) -> bool:
        """No part of any lesion in the image."""
        return not self.boxes and not self.partial_boxes

    def truth(self) -> dict:
        """JSON-ready truth of this frame."""
        out = {"frame": self.index, "boxes": self.boxes, "lesion_ids": self.lesion_ids,
               "partial_boxes": self.partial_boxes, "partial_ids": self.partial_ids,
               "lesion_free": self.lesion_free}
        if self.crop_box is not None:
            out["crop_box"] = list(self.crop_box)
        return out


@dataclass
class _Sweep:
    """One pass of the probe: the phantom strip, its lesions and the per-frame probe positions."""

    echo: np.ndarray
    speckle: np.ndarray
    masks: List[Tuple[int, np.ndarray, Tuple[int, int]]]  # (lesion id, mask crop, (x, y) of the crop)
    xs: np.ndarray  # probe left edge per frame (world pixels)
    dys: np.ndarray  # vertical shake per frame
    gains: np.ndarray


class SyntheticCine:
    """A deterministic synthetic cine clip: ``for frame in SyntheticCine(seed=0, num_frames=120)``.

    ``size`` (H, W) of the ultrasound image; ``sweep_frames`` the range of frames per sweep;
    ``lesion_prob`` the chance that a sweep passes over a lesion; ``speckle_corr`` how much of the
    speckle stays from frame to frame (0: fresh speckle every frame); ``gain_range`` the sweep's
    overall gain; ``shake`` the probe's jitter in pixels; ``screen`` draws the frames inside a
    static scanner screen of ``canvas`` (W, H) pixels, whose layout changes at ``layout_change_at``.
    """

    def __init__(self, seed: int = 0, num_frames: int = 120, size: Tuple[int, int] = (128, 160),
                 sweep_frames: Tuple[int, int] = (40, 80), lesion_prob: float = 0.7, speckle_corr: float = 0.7,
                 gain_range: Tuple[float, float] = (0.75, 1.25), shake: float = 1.0, screen: bool = False,
                 canvas: Optional[Tuple[int, int]] = None, layout_change_at: Optional[int] = None,
                 patient_name: str = "DOE^JANE"):
        if num_frames < 0:
            raise ValueError(f"num_frames must be >= 0, got {num_frames}")
        if not 0.0 <= speckle_corr <= 1.0:
            raise ValueError(f"speckle_corr must be in [0, 1], got {speckle_corr}")
        self.seed, self.num_frames = int(seed), int(num_frames)
        self.size = (int(size[0]), int(size[1]))
        self.lesion_prob, self.speckle_corr = float(lesion_prob), float(speckle_corr)
        self.gain_range, self.shake = tuple(gain_range), float(shake)
        self.screen, self.layout_change_at, self.patient_name = bool(screen), layout_change_at, patient_name
        h, w = self.size
        even = lambda v: int(v) + int(v) % 2  # noqa: E731  (video codecs want even sizes)
        self.canvas = tuple(canvas) if canvas is not None else (even(w * 2.4 + 120), even(h * 2.2 + 80))
        rng = np.random.default_rng([self.seed, 0])
        lo, hi = int(sweep_frames[0]), int(sweep_frames[1])
        if lo < 2 or hi < lo:
            raise ValueError(f"sweep_frames must be (lo, hi) with 2 <= lo <= hi, got {sweep_frames}")
        # the schedule: sweep lengths and whether each holds a lesion (small: a few ints per sweep)
        self.sweeps: List[Tuple[int, int, int]] = []  # (first frame, length, number of lesions)
        # each sweep's planned length: the clip may end mid-sweep, and the probe keeps its pace
        # (a sweep cut to a few frames must not cross the whole strip in them)
        self._planned: List[int] = []
        start = 0
        while start < self.num_frames:
            length = int(rng.integers(lo, hi + 1))
            n = int(rng.random() < self.lesion_prob)
            if n and rng.random() < 0.15 and length >= 0.75 * hi:
                n = 2
            self.sweeps.append((start, min(length, self.num_frames - start), n))
            self._planned.append(length)
            start += length
        self.lesion_kinds: Dict[int, str] = {}
        next_id = 1
        for s, (_, _, n) in enumerate(self.sweeps):
            krng = np.random.default_rng([self.seed, 1, s])
            for _ in range(n):
                self.lesion_kinds[next_id] = str(krng.choice(LESION_KINDS))
                next_id += 1
        self._screens: Dict[int, tuple] = {}

    def __len__(self) -> int:
        return self.num_frames

    # -- rendering --------------------------------------------------------------------------

    def _first_lesion_id(self, s: int) -> int:
        return 1 + sum(n for _, _, n in self.sweeps[:s])

    def _build_sweep(self, s: int) -> _Sweep:
        h, w = self.size
        _, length, n = self.sweeps[s]
        rng = np.random.default_rng([self.seed, 2, s])
        world_w = int(w * rng.uniform(2.6, 3.4))
        world_h = h + 2 * _PAD
        echo = _tissue(rng, world_h, world_w)
        masks = []
        ids = list(range(self._first_lesion_id(s), self._first_lesion_id(s) + n))
        # lesion centres spread over the middle of the strip, apart from each other
        centres = [0.5] if n == 1 else [0.36, 0.64][:n]
        for lid, c in zip(ids, centres):
            kind = self.lesion_kinds[lid]
            r = rng.uniform(0.08, 0.14) * min(h, w)
            cx = (c + rng.uniform(-0.05, 0.05)) * world_w
            cy = _PAD + rng.uniform(0.38, 0.65) * h
            mask = np.zeros((world_h, world_w), np.uint8)
            cv2.fillPoly(mask, [_lesion_polygon(rng, kind, cx, cy, r)], 1)
            mask[:_PAD] = 0
            mask[_PAD + h:] = 0
            echo = add_lesion(echo, mask, kind)
            ys, xs = np.nonzero(mask)
            y0, x0 = int(ys.min()), int(xs.min())
            masks.append((lid, mask[y0:ys.max() + 1, x0:xs.max() + 1].astype(bool), (x0, y0)))
        speckle = speckle_field(rng, world_h, world_w)
        # probe path: across the strip (direction alternating by sweep), uneven speed, plus shake
        full = max(self._planned[s], length, 2)
        speed = 1.0 + 0.5 * np.sin(np.linspace(0, 2 * np.pi, full) * rng.uniform(0.5, 1.5) + rng.uniform(0, 6))
        pos = np.concatenate([[0.0], np.cumsum(speed[:-1])])
        pos = pos / max(pos[-1], 1e-6) * (world_w - w)
        if s % 2 == 1:
            pos = (world_w - w) - pos
        shake_x = np.clip(rng.normal(0, self.shake, full), -2 * self.shake, 2 * self.shake)
        xs_ = np.clip(np.round(pos + shake_x), 0, world_w - w).astype(int)
        dys = np.clip(np.round(rng.normal(0, self.shake, full)), -_PAD, _PAD).astype(int)
        base = rng.uniform(*self.gain_range)
        drift = 1.0 + 0.08 * np.sin(np.linspace(0, 2 * np.pi, full) + rng.uniform(0, 6))
        gains = base * drift
        if rng.random() < 0.4:  # the user turns the gain knob mid-sweep
            at = int(rng.integers(1, full))
            gains[at:] *= rng.uniform(0.8, 1.2)
        return _Sweep(echo, speckle, masks, xs_, dys, gains)

    def _screen(self, which: int) -> tuple:
        """(workspace RGB, image box) of screen layout ``which`` (0, or 1 after the layout change)."""
        if which not in self._screens:
            from usdet.data.screens import make_screen

            h, w = self.size
            rng = np.random.default_rng([self.seed, 7, which])
            scr = make_screen(rng, np.zeros((h, w), np.uint8), probe="linear", theme="dark", canvas=self.canvas,
                              gain=1.0, doppler=False, jpeg_quality=0, header_text=self.patient_name)
            self._screens[which] = (scr.frame, tuple(int(v) for v in scr.box))
        return self._screens[which]

    def __iter__(self) -> Iterator[CineFrame]:
        h, w = self.size
        corr = self.speckle_corr
        for s, (start, length, _) in enumerate(self.sweeps):
            sw = self._build_sweep(s)
            for j in range(length):
                index = start + j
                frng = np.random.default_rng([self.seed, 3, index])
                x0, y0 = int(sw.xs[j]), _PAD + int(sw.dys[j])
                anchored = sw.speckle[y0:y0 + h, x0:x0 + w]
                fresh = speckle_field(frng, h, w)
                speckle = corr * anchored + (1.0 - corr) * fresh
                echo = sw.echo[y0:y0 + h, x0:x0 + w]
                gray = np.clip(echo * speckle * (255 * 0.9 * sw.gains[j]), 0, 255).astype(np.uint8)
                frame = CineFrame(index, np.repeat(gray[:, :, None], 3, axis=2))
                for lid, mask, (mx, my) in sw.masks:
                    # the part of the lesion's mask inside this frame's window
                    ax0, ay0 = max(mx, x0), max(my, y0)
                    ax1, ay1 = min(mx + mask.shape[1], x0 + w), min(my + mask.shape[0], y0 + h)
                    if ax1 <= ax0 or ay1 <= ay0:
                        continue
                    part = mask[ay0 - my:ay1 - my, ax0 - mx:ax1 - mx]
                    seen = int(part.sum())
                    if not seen:
                        continue
                    rows, cols = np.nonzero(part.any(axis=1))[0], np.nonzero(part.any(axis=0))[0]
                    box = [float(ax0 - x0 + cols[0]), float(ay0 - y0 + rows[0]),
                           float(ax0 - x0 + cols[-1] + 1), float(ay0 - y0 + rows[-1] + 1)]
                    if seen >= MIN_VISIBLE * int(mask.sum()):
                        frame.boxes.append(box)
                        frame.lesion_ids.append(lid)
                    else:
                        frame.partial_boxes.append(box)
                        frame.partial_ids.append(lid)
                if self.screen:
                    frame = self._on_screen(frame)
                yield frame

    def _on_screen(self, frame: CineFrame) -> CineFrame:
        which = int(self.layout_change_at is not None and frame.index >= self.layout_change_at)
        workspace, (bx0, by0, bx1, by1) = self._screen(which)
        h, w = self.size
        sx, sy = (bx1 - bx0) / w, (by1 - by0) / h
        out = workspace.copy()
        out[by0:by1, bx0:bx1] = cv2.resize(frame.image, (bx1 - bx0, by1 - by0), interpolation=cv2.INTER_LINEAR)
        scale = lambda b: [round(bx0 + b[0] * sx, 2), round(by0 + b[1] * sy, 2),  # noqa: E731
                           round(bx0 + b[2] * sx, 2), round(by0 + b[3] * sy, 2)]
        return CineFrame(frame.index, out, [scale(b) for b in frame.boxes], frame.lesion_ids,
                         [scale(b) for b in frame.partial_boxes], frame.partial_ids, (bx0, by0, bx1, by1))

    def describe(self) -> dict:
        """The generator's arguments and the lesions (id, kind), for the truth file."""
        return {"seed": self.seed, "num_frames": self.num_frames, "size": list(self.size),
                "lesion_prob": self.lesion_prob, "speckle_corr": self.speckle_corr,
                "gain_range": list(self.gain_range), "shake": self.shake, "screen": self.screen,
                "layout_change_at": self.layout_change_at, "min_visible": MIN_VISIBLE,
                "sweeps": [{"first_frame": a, "frames": b, "lesions": n} for a, b, n in self.sweeps],
                "lesions": [{"id": k, "kind": v} for k, v in sorted(self.lesion_kinds.items())]}


# ---------------------------------------------------------------------------------------------
# Writers: the same clip as a frame folder, a video, or a multi-frame DICOM (for tests, demo, bench)


def write_cine_truth(cine: SyntheticCine, truths: Sequence[dict], path: str) -> str:
    """Write the clip's truth (``describe()`` + one entry per frame) as JSON; returns ``path``."""
    from usdet.utils.io import atomic_write_json

    atomic_write_json(path, {"clip": cine.describe(), "frames": list(truths)})
    return path


def read_cine_truth(path: str) -> dict:
    """The truth JSON written by :func:`write_cine_truth`."""
    import json

    with open(path, "r", encoding="utf-8") as fh:
        return json.load(fh)


def write_cine_frames(cine: SyntheticCine, folder: str, ext: str = ".png") -> List[dict]:
    """Write ``folder/frame_00000.png``... (one file per frame); returns the per-frame truth."""
    from usdet.utils.io import atomic_write_image

    os.makedirs(folder, exist_ok=True)
    truths = []
    for fr in cine:
        atomic_write_image(os.path.join(folder, f"frame_{fr.index:05d}{ext}"), fr.image)
        truths.append(fr.truth())
    return truths


def write_cine_video(cine: SyntheticCine, path: str, fps: float = 15.0, fourcc: Optional[str] = None) -> List[dict]:
    """Write the clip as a video OpenCV reads (MJPG in .avi, mp4v in .mp4 unless ``fourcc``);
    returns the per-frame truth. Written to a temporary name, then renamed."""
    ext = os.path.splitext(path)[1].lower()
    fourcc = fourcc or ("mp4v" if ext in (".mp4", ".m4v", ".mov") else "MJPG")
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".tmp_{os.getpid()}_{os.path.basename(path)}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    writer = None
    truths = []
    try:
        for fr in cine:
            if writer is None:
                hh, ww = fr.image.shape[:2]
                writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*fourcc), float(fps), (ww, hh))
                if not writer.isOpened():
                    raise OSError(f"{path}: OpenCV cannot write {fourcc} video here")
            writer.write(np.ascontiguousarray(fr.image[:, :, ::-1]))
            truths.append(fr.truth())
    finally:
        if writer is not None:
            writer.release()
    if writer is None:
        raise ValueError(f"{path}: a clip of 0 frames cannot be written as a video")
    os.replace(tmp, path)
    return truths


def write_cine_dicom(cine: SyntheticCine, path: str, patient_name: str = "DOE^JANE", patient_id: str = "MRN-0042",
                     transfer_syntax: Optional[str] = None, regions: bool = False) -> List[dict]:
    """Write the clip as an ultrasound multi-frame DICOM (MONOCHROME2, 8-bit) with a patient name
    and ID in the header (to test that they reach no output); ``transfer_syntax`` a UID pydicom
    can encode (e.g. RLE Lossless), default Explicit VR Little Endian; ``regions`` writes the
    image box of screen clips as a SequenceOfUltrasoundRegions item. Holds the whole clip in
    memory: for tests and demos, not for long clips."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    from .dicom import write_ultrasound_dicom

    frames, truths = [], []
    for fr in cine:
        frames.append(cv2.cvtColor(fr.image, cv2.COLOR_RGB2GRAY))
        truths.append(fr.truth())
    rows, cols = frames[0].shape if frames else cine.size
    tags: Dict[str, Any] = {"PatientName": patient_name, "PatientID": patient_id, "CineRate": 15}
    if regions and truths and "crop_box" in truths[0]:
        x0, y0, x1, y1 = truths[0]["crop_box"]
        item = Dataset()
        item.RegionSpatialFormat, item.RegionDataType = 1, 1
        item.RegionLocationMinX0, item.RegionLocationMinY0 = int(x0), int(y0)
        item.RegionLocationMaxX1, item.RegionLocationMaxY1 = int(x1) - 1, int(y1) - 1
        tags["SequenceOfUltrasoundRegions"] = DicomSequence([item])
    pixels = np.stack(frames) if frames else np.zeros((0, int(rows), int(cols)), np.uint8)
    write_ultrasound_dicom(path, pixels.astype(np.uint8), "MONOCHROME2", frames=len(frames),
                           transfer_syntax=transfer_syntax, **tags)
    return truths


def make_cine_clip(path: str, seed: int = 0, num_frames: int = 120, fmt: Optional[str] = None, **kw) -> str:
    """Write one synthetic clip to ``path`` (a folder for ``fmt="frames"``; else by extension:
    .dcm DICOM, anything else video) and its truth to ``path + ".truth.json"``; returns the truth path."""
    cine = SyntheticCine(seed=seed, num_frames=num_frames, **kw)
    fmt = fmt or ("dicom" if path.lower().endswith(".dcm") else "video")
    if fmt == "frames":
        truths = write_cine_frames(cine, path)
    elif fmt == "dicom":
        truths = write_cine_dicom(cine, path)
    elif fmt == "video":
        truths = write_cine_video(cine, path)
    else:
        raise ValueError(f"fmt must be frames, dicom or video, got {fmt!r}")
    return write_cine_truth(cine, truths, path.rstrip("/\\") + ".truth.json")
