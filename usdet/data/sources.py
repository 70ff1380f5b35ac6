"""One way to enumerate and read source frames: stills (PNG/JPEG/BMP/TIFF) and DICOM (every frame).

Hospital exports mix stills and DICOM, often DICOM without an extension (``IM_0001``); the
cropping tool, the hospital converter and the predictor all walk inputs through here so they
agree on what counts as a frame and how frames are numbered.
"""
from __future__ import annotations

import os
from typing import Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np

from .dicom import DICOM_EXTENSIONS, DicomFrames, is_dicom_file
from .image_io import IMAGE_EXTENSIONS, read_image

__all__ = ["open_source", "iter_source_frames", "list_sources", "is_source_file", "frame_key", "SOURCE_EXTENSIONS"]

SOURCE_EXTENSIONS = tuple(IMAGE_EXTENSIONS) + tuple(DICOM_EXTENSIONS)


def is_source_file(path: str) -> bool:
    """True for a still-image or DICOM extension, or an extension-less file with the DICOM magic."""
    name = os.path.basename(path)
    if name.startswith("."):
        return False
    ext = os.path.splitext(name)[1].lower()
    if ext in SOURCE_EXTENSIONS:
        return True
    return ext == "" and is_dicom_file(path)


def list_sources(paths_or_dirs: Union[str, Iterable[str]]) -> List[str]:
    """Expand files and folders (recursively, hidden entries skipped) into a sorted list of frame sources.

    Files named explicitly are kept as given (even with an unknown extension, so the reader can
    report them); files found in folders must look like images or DICOM.
    """
    if isinstance(paths_or_dirs, (str, os.PathLike)):
        paths_or_dirs = [paths_or_dirs]
    found: List[str] = []
    for p in paths_or_dirs:
        p = os.fspath(p)
        if os.path.isdir(p):
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    full = os.path.join(root, name)
                    if is_source_file(full):
                        found.append(full)
        else:
            found.append(p)
    return sorted(dict.fromkeys(found))


class _Still:
    """A still image as a one-frame source (no header regions, no grey-scale choice)."""

    regions: tuple = ()
    grey_scale: Optional[str] = None
    grey_scale_method: Optional[str] = None

    def __init__(self, path: str):
        self.path = path

    def __iter__(self) -> Iterator[Tuple[Optional[int], np.ndarray]]:
        yield None, read_image(self.path)


def open_source(path: str) -> Union[DicomFrames, _Still]:
    """One source to iterate as ``(frame_index, rgb)`` (index None for a still), with the header's
    ultrasound ``regions`` and the ``grey_scale`` used (DICOM; empty / None for stills).

    Raises ``ImageReadError`` (``DicomReadError`` for DICOM) naming the file and the problem.
    """
    path = os.fspath(path)
    return DicomFrames(path) if is_dicom_file(path) else _Still(path)


def iter_source_frames(path: str) -> Iterator[Tuple[Optional[int], np.ndarray]]:
    """Yield ``(frame_index, rgb)``: ``(None, image)`` for a still, ``(i, frame)`` for each DICOM frame.

    Raises ``ImageReadError`` (``DicomReadError`` for DICOM) naming the file and the problem.
    """
    yield from open_source(path)


def frame_key(rel_path: str, frame_index: Optional[int]) -> str:
    """Key naming one frame in JSON outputs: the relative path, plus ``#<index>`` for DICOM frames."""
    rel_path = rel_path.replace(os.sep, "/")
    return rel_path if frame_index is None else f"{rel_path}#{frame_index}"
