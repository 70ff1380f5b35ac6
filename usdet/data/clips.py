"""Read a cine clip frame by frame: a video file, a multi-frame DICOM, or a folder of ordered frames.

Scanners export cine loops as multi-frame DICOM or video; research sets often keep them as frame
folders. All three stream here, one frame in memory at a time, as ``(index, rgb)``. A fault (a
truncated file, no frames, a frame of another size mid-clip, an undecodable codec) stops the
clip with one :class:`ClipReadError` that names the file and the frame; every frame before the
fault has been yielded. ``ClipCropper`` finds the scanner workspace once per clip and looks for
it again only when the frame layout changes.
"""
from __future__ import annotations

import os
import re
from typing import Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from .dicom import DicomFrames, DicomReadError, is_dicom_file
from .image_io import IMAGE_EXTENSIONS, ImageReadError, read_image

__all__ = ["ClipReadError", "Clip", "open_clip", "clip_kind", "is_video_file", "VIDEO_EXTENSIONS", "ClipCropper"]

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".ogv")


class ClipReadError(ImageReadError):
    """A clip could not be read (further); the message names the file and the frame."""

    def __init__(self, path: str, reason: str, frame: Optional[int] = None):
        self.frame = frame
        super().__init__(path, reason if frame is None else f"frame {frame}: {reason}")
        self.reason = reason if frame is None else f"frame {frame}: {reason}"


def is_video_file(path: str) -> bool:
    """True for a file with a video extension."""
    return os.path.isfile(path) and os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS


def clip_kind(path: str) -> Optional[str]:
    """``"frames"`` for a folder, ``"dicom"`` for DICOM, ``"video"`` for a video file, else None."""
    if os.path.isdir(path):
        return "frames"
    if os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS:
        return "video"
    if is_dicom_file(path):
        return "dicom"
    return None


def _natural_key(name: str) -> List[object]:
    """frame_2 before frame_10: digit runs compare as numbers."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


class Clip:
    """One clip opened for streaming: ``for index, rgb in clip``.

    ``kind`` (video / dicom / frames), ``num_frames`` (as the file says; None if unknown),
    ``fps`` (None if unknown), ``regions`` (a DICOM's ultrasound regions, else empty). Iteration
    raises :class:`ClipReadError` at the first fault, after every good frame before it.
    """

    def __init__(self, path: str, kind: Optional[str] = None):
        self.path = path = os.fspath(path)
        if not os.path.exists(path):
            raise ClipReadError(path, "cannot open (no such file or folder)")
        self.kind = kind or clip_kind(path)
        if self.kind is None:
            raise ClipReadError(path, "not a clip: expected a video file "
                                f"({', '.join(VIDEO_EXTENSIONS)}), a multi-frame DICOM or a folder of frames")
        self.fps: Optional[float] = None
        self.num_frames: Optional[int] = None
        self.regions: Sequence = ()
        self.size: Optional[Tuple[int, int]] = None  # (W, H) of the first frame
        self._files: List[str] = []
        self._dicom: Optional[DicomFrames] = None
        if self.kind == "video":
            if os.path.getsize(path) == 0:
                raise ClipReadError(path, "zero-byte file: no frames", 0)
            cap = cv2.VideoCapture(path)
            try:
                if not cap.isOpened():
                    raise ClipReadError(path, "cannot open the video: unreadable or unsupported codec, or a "
                                        "truncated / damaged file", 0)
                n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
                fps = float(cap.get(cv2.CAP_PROP_FPS))
                self.num_frames = n if n > 0 else None
                self.fps = fps if fps > 0 else None
            finally:
                cap.release()
        elif self.kind == "frames":
            names = sorted((n for n in os.listdir(path)
                            if not n.startswith(".") and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS),
                           key=_natural_key)
            self._files = [os.path.join(path, n) for n in names]
            self.num_frames = len(self._files)
        else:
            try:
                self._dicom = DicomFrames(path)
            except DicomReadError as e:
                raise ClipReadError(path, e.reason, 0) from None
            ds = self._dicom.ds
            self.num_frames = int(ds.get("NumberOfFrames", 1) or 0)
            self.regions = self._dicom.regions
            rate = ds.get("CineRate", None) or ds.get("RecommendedDisplayFrameRate", None)
            try:
                self.fps = float(rate) if rate else (1000.0 / float(ds.FrameTime) if "FrameTime" in ds else None)
            except (TypeError, ValueError, ZeroDivisionError):
                self.fps = None

    def __len__(self) -> int:
        return int(self.num_frames or 0)

    def __iter__(self) -> Iterator[Tuple[int, np.ndarray]]:
        it = {"video": self._video, "frames": self._folder, "dicom": self._dicom_frames}[self.kind]  # type: ignore[index]
        count = 0
        for index, rgb in it():
            size = (int(rgb.shape[1]), int(rgb.shape[0]))
            if self.size is None:
                self.size = size
            elif size != self.size:
                raise ClipReadError(self.path, f"frame is {size[0]}x{size[1]}, the clip's frames are "
                                    f"{self.size[0]}x{self.size[1]}", index)
            yield index, rgb
            count += 1
        if count == 0:
            raise ClipReadError(self.path, "no frames (empty clip)", 0)

    def _video(self) -> Iterator[Tuple[int, np.ndarray]]:
        cap = cv2.VideoCapture(self.path)
        if not cap.isOpened():
            raise ClipReadError(self.path, "cannot open the video: unreadable or unsupported codec", 0)
        i = 0
        try:
            while True:
                ok, bgr = cap.read()
                if not ok or bgr is None:
                    break
                yield i, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                i += 1
        finally:
            cap.release()
        if i == 0:
            raise ClipReadError(self.path, "no frame could be decoded (empty video, unsupported codec or damaged "
                                "file)", 0)
        if self.num_frames is not None and i < self.num_frames:
            raise ClipReadError(self.path, f"decoding stopped after {i} of the {self.num_frames} frames the file "
                                "announces (truncated or damaged file)", i)

    def _folder(self) -> Iterator[Tuple[int, np.ndarray]]:
        for i, f in enumerate(self._files):
            try:
                rgb = read_image(f)
            except ImageReadError as e:
                raise ClipReadError(self.path, f"{os.path.basename(f)}: {e.reason}", i) from None
            yield i, rgb

    def _dicom_frames(self) -> Iterator[Tuple[int, np.ndarray]]:
        d = self._dicom
        assert d is not None
        if self.num_frames == 0:
            raise ClipReadError(self.path, "the DICOM has no frames (NumberOfFrames 0)", 0)
        complete = _complete_native_frames(d.ds)
        i = 0
        try:
            for i_, rgb in d:
                i = i_
                yield i_, rgb
                i = i_ + 1
        except DicomReadError as e:
            raise ClipReadError(self.path, e.reason, i) from None
        if complete is not None:
            raise ClipReadError(self.path, f"truncated: the pixel data holds {complete} complete frames of the "
                                f"{self.num_frames} the header announces", complete)


def _complete_native_frames(ds) -> Optional[int]:
    """For uncompressed pixel data shorter than the header announces (a truncated file): make the
    dataset hold only its complete frames and return their number; None when nothing is missing."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or getattr(syntax, "is_compressed", True) or "PixelData" not in ds:
        return None
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    spp, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("BitsAllocated", 8) or 8)
    n = int(ds.get("NumberOfFrames", 1) or 1)
    frame_bytes = rows * cols * spp * bits // 8
    data = ds.PixelData
    if frame_bytes <= 0 or len(data) >= n * frame_bytes:
        return None
    complete = len(data) // frame_bytes
    ds.NumberOfFrames = complete
    ds.PixelData = bytes(data[: complete * frame_bytes])
    return complete


def open_clip(path: str) -> Clip:
    """Open ``path`` as a clip; raises :class:`ClipReadError` naming the file (and frame) otherwise."""
    return Clip(path)


# ---------------------------------------------------------------------------------------------
# Workspace crop once per clip


#: a frame's layout has changed when more than this fraction of its workspace map flips
LAYOUT_CHANGE = 0.02
#: the workspace map is taken at 1/LAYOUT_SCALE of the frame size
LAYOUT_SCALE = 8
#: grey levels within which a (downscaled) pixel counts as workspace background
LAYOUT_TOL = 3


class ClipCropper:
    """The image region(s) of each frame of one clip, found once and re-checked on layout changes.

    The DICOM header's ultrasound regions are used as they are. Otherwise usdet's cropper
    (``usdet.data.views.find_views``) runs on the first frame; on later frames a map of the
    background-coloured workspace (at 1/8 scale, the colour taken from the frame border) is
    compared with the first one, and only when more than 2% of it flips (the image moved or
    changed size, a panel opened) does the cropper run again. A refused crop is retried on the
    next frame. ``calls`` counts cropper runs, ``changes`` layout changes that moved the crop.
    """

    def __init__(self, regions: Sequence = (), enabled: bool = True):
        self.regions = list(regions)
        self.enabled = enabled
        self.calls = 0
        self.changes = 0
        self._boxes: Optional[List[Tuple[int, int, int, int]]] = None
        self._note: Optional[str] = None
        self._ref: Optional[np.ndarray] = None
        self._bg: Optional[np.ndarray] = None
        self._size: Optional[Tuple[int, int]] = None
        self.history: List[dict] = []  # {frame, boxes, note}: each crop decision and where it began

    def _layout_map(self, frame: np.ndarray) -> np.ndarray:
        h, w = frame.shape[:2]
        small = cv2.resize(frame, (max(1, w // LAYOUT_SCALE), max(1, h // LAYOUT_SCALE)), interpolation=cv2.INTER_AREA)
        return (np.abs(small.astype(np.int16) - self._bg).max(axis=2) <= LAYOUT_TOL)

    def _run(self, frame: np.ndarray, index: int) -> None:
        from .views import find_views, regions_to_views

        h, w = frame.shape[:2]
        self.calls += 1
        results = regions_to_views(self.regions, w, h) if self.regions else None
        if results is None:
            try:
                results = find_views(frame)
            except Exception as e:  # a cropper bug must not stop the clip
                self._set([(0, 0, w, h)], f"cropper failed ({type(e).__name__}: {e}); used the full frame", index)
                return
        refused = [r for r in results if r.box is None]
        if refused or not results:
            reason = refused[0].reason if refused else "no image region"
            self._set([(0, 0, w, h)], f"crop refused ({reason}); used the full frame", index)
            return
        boxes = [tuple(int(v) for v in r.box) for r in results]  # type: ignore[union-attr]
        if self._boxes is not None and self._note is None and len(boxes) == len(self._boxes) and all(
                max(abs(a - b) for a, b in zip(x, y)) <= 2 for x, y in zip(boxes, self._boxes)):
            boxes = self._boxes  # the same layout: keep the crop exactly as it was
        self._set(boxes, None, index)

    def _set(self, boxes, note, index) -> None:
        if self._boxes is not None and (boxes != self._boxes or note != self._note):
            self.changes += 1
        if self._boxes is None or boxes != self._boxes or note != self._note:
            self.history.append({"frame": index, "crop_boxes": [list(b) for b in boxes], "note": note})
        self._boxes, self._note = list(boxes), note

    def _regions(self, shape: Tuple[int, int]) -> None:
        """Cells of the layout map wholly outside the crop (workspace) and on its inner edge."""
        mh, mw = shape
        inside = np.zeros((mh, mw), bool)
        edge = np.zeros((mh, mw), bool)
        s = LAYOUT_SCALE
        for x0, y0, x1, y1 in self._boxes or []:
            cx0, cy0 = x0 // s, y0 // s
            cx1, cy1 = min(mw, -(-x1 // s)), min(mh, -(-y1 // s))
            inside[cy0:cy1, cx0:cx1] = True
            ix0, iy0, ix1, iy1 = -(-x0 // s), -(-y0 // s), min(mw, x1 // s), min(mh, y1 // s)
            if ix1 - ix0 > 2 and iy1 - iy0 > 2:
                edge[iy0:iy1, ix0:ix1] = True
                edge[iy0 + 1:iy1 - 1, ix0 + 1:ix1 - 1] = False
        self._outside, self._edge = ~inside, edge

    def _changed(self, current: np.ndarray) -> bool:
        ref = self._ref
        flips = float((current != ref)[self._outside].sum()) / current.size
        if flips > LAYOUT_CHANGE:
            return True  # the workspace changed: the image moved or grew, or a panel opened
        if self._edge.any():  # the crop's inner edge turned to workspace: the image shrank or moved
            return float(current[self._edge].mean()) - float(ref[self._edge].mean()) > 0.25
        return False

    def __call__(self, frame: np.ndarray, index: int) -> Tuple[List[Tuple[int, int, int, int]], Optional[str]]:
        """``(boxes, note)`` for this frame: one box per view; ``note`` set when the full frame is used."""
        h, w = frame.shape[:2]
        if not self.enabled:
            if self._boxes is None or self._size != (w, h):
                self._size = (w, h)
                self._set([(0, 0, w, h)], None, index)
            return self._boxes, None  # type: ignore[return-value]
        if self.regions:  # the header's regions hold for every frame of the file
            if self._boxes is None:
                self._run(frame, index)
            return self._boxes, self._note  # type: ignore[return-value]
        if self._boxes is None or self._note is not None or self._size != (w, h):
            self._size = (w, h)
            ring = np.concatenate([frame[:2].reshape(-1, 3), frame[-2:].reshape(-1, 3),
                                   frame[:, :2].reshape(-1, 3), frame[:, -2:].reshape(-1, 3)])
            self._bg = np.median(ring, axis=0).astype(np.int16)
            self._run(frame, index)
            self._ref = self._layout_map(frame)
            self._regions(self._ref.shape)
            return self._boxes, self._note  # type: ignore[return-value]
        if self._boxes == [(0, 0, w, h)]:
            return self._boxes, None  # no workspace around the image (an already cropped clip)
        current = self._layout_map(frame)
        if self._changed(current):
            self._run(frame, index)
            self._ref = current
            self._regions(current.shape)
        return self._boxes, self._note  # type: ignore[return-value]
