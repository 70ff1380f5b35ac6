"""Write an MP4 that browsers play: H.264 (yuv420p, moov atom first), from a registry package.

OpenCV's pip wheels cannot encode H.264 (their ``avc1`` writer needs a hardware encoder that is
not there), and their ``mp4v`` (MPEG-4 Part 2) does not play in browsers. ``imageio-ffmpeg``
(PyPI) ships an ffmpeg with libx264; frames are piped to it one at a time (memory flat in clip
length). Without it, OpenCV's ``avc1`` is tried, then ``mp4v`` with a note saying browsers may
not play the file. The file is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

__all__ = ["VideoWriter", "even_size"]


def even_size(width: int, height: int) -> tuple:
    """H.264 in yuv420p needs even dimensions: round each up to the next even number."""
    return width + (width % 2), height + (height % 2)


class VideoWriter:
    """``with VideoWriter(path, fps) as w: w.write(rgb)``; ``codec`` and ``note`` say what was used.

    Frames are RGB uint8 of one size (padded with black to even dimensions). On an exception
    inside the ``with`` block the partial file is still completed and renamed (the frames before
    a fault keep their overlay); ``abort()`` drops it instead.
    """

    def __init__(self, path: str, fps: float = 15.0, crf: int = 23):
        self.path = os.fspath(path)
        self.fps = float(fps) if fps and fps > 0 else 15.0
        self.crf = int(crf)
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        self._tmp = os.path.join(folder, f".{os.path.basename(self.path)}.{os.getpid()}.tmp.mp4")
        self.codec: Optional[str] = None
        self.note: Optional[str] = None
        self.frames = 0
        self._gen = None
        self._cv = None
        self._size: Optional[tuple] = None

    def __enter__(self) -> "VideoWriter":
        return self

    def _open(self, width: int, height: int) -> None:
        self._size = (width, height)
        try:
            import imageio_ffmpeg
        except ImportError:
            imageio_ffmpeg = None
        if imageio_ffmpeg is not None:
            self._gen = imageio_ffmpeg.write_frames(
                self._tmp, (width, height), pix_fmt_in="rgb24", pix_fmt_out="yuv420p", fps=self.fps,
                codec="libx264", quality=None, macro_block_size=1, ffmpeg_log_level="error",
                output_params=["-crf", str(self.crf), "-preset", "veryfast", "-movflags", "+faststart",
                               "-f", "mp4"])
            self._gen.send(None)
            self.codec = "h264 (libx264 via imageio-ffmpeg)"
            return
        import cv2

        for fourcc, codec in (("avc1", "h264 (OpenCV avc1)"), ("mp4v", "mp4v (MPEG-4 Part 2)")):
            w = cv2.VideoWriter(self._tmp, cv2.VideoWriter_fourcc(*fourcc), self.fps, (width, height))
            if w.isOpened():
                self._cv, self.codec = w, codec
                if fourcc == "mp4v":
                    self.note = ("imageio-ffmpeg is not installed and OpenCV cannot encode H.264 here: mp4v written, "
                                 "which browsers may not play (pip install imageio-ffmpeg)")
                return
            w.release()
        raise OSError(f"{self.path}: no MP4 encoder available (install imageio-ffmpeg)")

    def write(self, rgb: np.ndarray) -> None:
        """Append one RGB frame (the first frame fixes the size; later ones must match it)."""
        h, w = rgb.shape[:2]
        ew, eh = even_size(w, h)
        if self._size is None:
            self._open(ew, eh)
        if (ew, eh) != self._size:
            raise ValueError(f"{self.path}: frame {self.frames} is {w}x{h}, the video is {self._size[0]}x{self._size[1]}")
        if (ew, eh) != (w, h):
            pad = np.zeros((eh, ew, 3), np.uint8)
            pad[:h, :w] = rgb[:, :, :3]
            rgb = pad
        rgb = np.ascontiguousarray(rgb[:, :, :3], dtype=np.uint8)
        if self._gen is not None:
            self._gen.send(rgb)
        else:
            self._cv.write(rgb[:, :, ::-1].copy())
        self.frames += 1

    def close(self) -> Optional[str]:
        """Finish the file and rename it into place; returns the path (None when no frame was written)."""
        if self._gen is not None:
            self._gen.close()
            self._gen = None
        if self._cv is not None:
            self._cv.release()
            self._cv = None
        if self.frames == 0:
            self.abort()
            return None
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Stop and remove the partial file."""
        for closer in (getattr(self._gen, "close", None), getattr(self._cv, "release", None)):
            if closer is not None:
                try:
                    closer()
                except Exception:  # noqa: BLE001
                    pass
        self._gen = self._cv = None
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and issubclass(exc_type, (KeyboardInterrupt, SystemExit)):
            self.abort()
            return
        self.close()
