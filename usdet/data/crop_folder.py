"""Crop every frame of a folder into a workspace-free copy, with ``crops.json`` saying what was done.

The folder-level job of ``tools/crop_workspace.py``: each source (image or DICOM, every frame)
is split into views and cropped by :mod:`usdet.data.views` (DICOM ultrasound regions, else the
pixel cropper of :mod:`usdet.data.crop`), optionally cleaned of burned-in marks, and written
atomically; refusals and unreadable files are listed, not written.
"""
from __future__ import annotations

import os
import sys
from typing import Dict, List, Tuple

from tqdm import tqdm

from usdet.utils.io import atomic_write_image, atomic_write_json

from .crop import apply_crop, suppress_marks
from .image_io import ImageReadError
from .sources import frame_key, list_sources, open_source
from .views import find_views, view_key

__all__ = ["crop_directory", "summarize_crops"]


def _crop_source(task: Tuple[str, str, str, bool]) -> List[Tuple[str, Dict[str, object]]]:
    """Crop every frame of one source file into the output tree; one (key, entry) per frame, or per
    view of a multi-view frame (``<frame key>@view<k>``, sharing ``frame``)."""
    path, rel, out_dir, suppress = task
    out: List[Tuple[str, Dict[str, object]]] = []
    try:
        src = open_source(path)
        for idx, rgb in src:
            key = frame_key(rel, idx)
            base = rel if idx is None else f"{rel}.frame{idx:04d}.png"
            if idx is None and os.path.splitext(rel)[1].lower() not in (".png", ".jpg", ".jpeg", ".bmp", ".tif",
                                                                        ".tiff"):
                base = rel + ".png"
            views = find_views(rgb, src.regions)
            for k, res in enumerate(views):
                view = k if len(views) > 1 else None
                entry = res.to_dict()
                if view is not None:
                    entry.update(frame=key, view=view)
                if src.grey_scale_method not in (None, "8-bit stored values", "palette colour lookup"):
                    entry["grey_scale"] = src.grey_scale
                if res.box is not None:
                    img = apply_crop(rgb, res.box)
                    if suppress:
                        img, changed = suppress_marks(img)
                        entry["marks_changed"] = changed
                    stem, ext = os.path.splitext(base)
                    out_rel = base if view is None else f"{stem}.view{view}{ext}"
                    atomic_write_image(os.path.join(out_dir, out_rel), img)
                    entry["output"] = out_rel.replace(os.sep, "/")
                out.append((view_key(key, view), entry))
    except ImageReadError as e:
        out.append((frame_key(rel, None), {"box": None, "reason": f"failed: {e.reason}", "confidence": 0.0,
                                           "failed": True}))
    return out


def crop_directory(input_dir: str, output_dir: str, workers: int = 1, suppress: bool = False,
                   progress: bool = True) -> Dict[str, Dict[str, object]]:
    """Crop every frame under ``input_dir`` into ``output_dir`` (same relative paths, DICOM frames as
    ``<file>.frameNNNN.png``, views of a multi-view frame as ``<name>.view<k>.<ext>``) and write
    ``output_dir/crops.json``; returns its entries. Crops come from the DICOM header's ultrasound
    regions when it has them, else from the pixels (usdet.data.views).

    Raises OSError (with the file name) when an output cannot be written; crops.json is then absent."""
    if not os.path.isdir(input_dir):
        raise NotADirectoryError(f"{input_dir}: --input is not a folder")
    try:  # an earlier run's index must not describe crops this run is replacing (killed / disk full)
        os.remove(os.path.join(output_dir, "crops.json"))
    except FileNotFoundError:
        pass
    out_real = os.path.realpath(output_dir)
    sources = [p for p in list_sources(input_dir) if not os.path.realpath(p).startswith(out_real + os.sep)]
    tasks = [(p, os.path.relpath(p, input_dir).replace(os.sep, "/"), output_dir, suppress) for p in sources]
    entries: Dict[str, Dict[str, object]] = {}
    bar = tqdm(total=len(tasks), desc="crop", unit="file", disable=not progress, file=sys.stderr)
    if workers > 1 and len(tasks) > 1:
        from multiprocessing import get_context

        with get_context("spawn").Pool(workers) as pool:
            for res in pool.imap_unordered(_crop_source, tasks, chunksize=4):
                entries.update(res)
                bar.update(1)
    else:
        for t in tasks:
            entries.update(_crop_source(t))
            bar.update(1)
    bar.close()
    entries = dict(sorted(entries.items()))
    atomic_write_json(os.path.join(output_dir, "crops.json"), entries)
    return entries


def summarize_crops(entries: Dict[str, Dict[str, object]]) -> Dict[str, int]:
    """Counts of cropped / refused / failed frames in a crops.json mapping."""
    failed = sum(1 for e in entries.values() if e.get("failed"))
    cropped = sum(1 for e in entries.values() if e.get("box") is not None)
    return {"cropped": cropped, "refused": len(entries) - cropped - failed, "failed": failed}
