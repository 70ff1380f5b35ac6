"""Atomic file writes: a killed run never leaves a half-written file that looks valid.

Every output usdet writes (JSON, images, checkpoints' side files) goes through here: write to a
temporary file in the same folder, flush and fsync, then ``os.replace`` onto the final name.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable, Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: PathLike, write_fn: Callable[[Any], None], mode: str = "wb", fsync: bool = True) -> None:
    """Call ``write_fn(fh)`` on a temp file beside ``path``, fsync it, then rename onto ``path``.

    On any error (disk full included) the temp file is removed and ``path`` is untouched.
    ``fsync=False`` suits bulk image writes whose caller syncs once before writing the index
    (JSON) that makes them visible: the rename still keeps every file whole or absent.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual mode
        with os.fdopen(fd, mode) as fh:
            write_fn(fh)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and not e.filename:  # e.g. disk full: say which file
            raise OSError(e.errno, e.strerror, path) from e
        raise


def atomic_write_bytes(path: PathLike, data: bytes, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_write(path, lambda fh: fh.write(data), "wb", fsync=fsync)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return None if np.isnan(o) else float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _nan_to_none(o: Any) -> Any:
    if isinstance(o, float) and o != o:
        return None
    if isinstance(o, dict):
        return {k: _nan_to_none(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_nan_to_none(v) for v in o]
    return o


def dumps_json(obj: Any, indent: int | None = 2) -> str:
    """Deterministic JSON text: NaN becomes ``null``, numpy scalars become Python numbers."""
    return json.dumps(_nan_to_none(obj), indent=indent, default=_json_default, allow_nan=False) + "\n"


def atomic_write_json(path: PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON atomically (same object -> byte-identical file)."""
    atomic_write_text(path, dumps_json(obj, indent))


def atomic_write_image(path: PathLike, image: np.ndarray, rgb: bool = True) -> None:
    """Encode ``image`` (HxW or HxWx3 uint8, RGB unless ``rgb=False``) by extension and write atomically."""
    import cv2

    ext = os.path.splitext(os.fspath(path))[1] or ".png"
    arr = image
    if arr.ndim == 3 and rgb:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(ext, arr)
    if not ok:
        raise OSError(f"{path}: could not encode image as {ext}")
    atomic_write_bytes(path, buf.tobytes())
