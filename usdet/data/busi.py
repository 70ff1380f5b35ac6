"""BUSI (Al-Dhabyani et al. 2020): the layout of ``Dataset_BUSI_with_GT``, for the converter core.

BUSI ships ``benign/``, ``malignant/`` and ``normal/`` folders of ``NAME.png`` images with
``NAME_mask.png`` (+ ``NAME_mask_1.png``, ...) masks. The original study kept one box per image;
here every non-empty mask file becomes its own annotation, normals are kept as negatives, and
near-duplicate frames (BUSI has many) are grouped from their pixels by the core
(:mod:`usdet.data.convert`) so a group never straddles train/val/test. Exact duplicates whose
labels disagree are dropped, since no label can be trusted.
"""
from __future__ import annotations

import os
import re
from collections import defaultdict
from typing import Any, Dict, List, Optional, Tuple

from usdet.data.convert import ConvertOptions, MaskFile, SourceImage, SourceScan, convert, natural_key

CLASS_FOLDERS = ("benign", "malignant", "normal")
_MASK_RE = re.compile(r"^(?P<stem>.+)_mask(?:_(?P<index>\d+))?$")
_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

EXPECTED_LAYOUT = """expected the BUSI layout (Dataset_BUSI_with_GT):
  ROOT/benign/benign (1).png, ROOT/benign/benign (1)_mask.png, ROOT/benign/benign (4)_mask_1.png, ...
  ROOT/malignant/malignant (1).png, ROOT/malignant/malignant (1)_mask.png, ...
  ROOT/normal/normal (1).png, ROOT/normal/normal (1)_mask.png, ...
i.e. ROOT holds the class folders benign/, malignant/, normal/ (at least one of them)"""
DESCRIPTION = "BUSI (Al-Dhabyani et al. 2020, Data in Brief 28:104863), converted by usdet"


class BusiLayoutError(ValueError):
    """ROOT does not look like BUSI; the message says what was expected."""


def check_root(root: str) -> List[str]:
    """Return the class folders present in ``root``; raise BusiLayoutError when there are none."""
    if not os.path.isdir(root):
        raise BusiLayoutError(f"ROOT {root!r} is not a folder; {EXPECTED_LAYOUT}")
    present = [c for c in CLASS_FOLDERS if os.path.isdir(os.path.join(root, c))]
    if not present:
        entries = sorted(os.listdir(root))[:10]
        hint = ""
        for sub in entries:
            if os.path.isdir(os.path.join(root, sub)) and any(
                    os.path.isdir(os.path.join(root, sub, c)) for c in CLASS_FOLDERS):
                hint = f"\n(did you mean --root {os.path.join(root, sub)!r}?)"
        raise BusiLayoutError(f"ROOT {root!r} has no benign/, malignant/ or normal/ folder "
                              f"(it holds: {entries or 'nothing'}); {EXPECTED_LAYOUT}{hint}")
    return present


def scan_busi(root: str) -> SourceScan:
    """Pair BUSI's images with their masks; every file not used is listed with its reason."""
    present = check_root(root)
    images: List[SourceImage] = []
    skipped: List[Dict[str, str]] = []
    found: Dict[str, Dict[str, int]] = {}
    for label in present:
        folder = os.path.join(root, label)
        stems: Dict[str, str] = {}
        masks: Dict[str, List[Tuple[int, str]]] = defaultdict(list)
        for fname in sorted(os.listdir(folder), key=natural_key):
            rel = f"{label}/{fname}"
            if os.path.isdir(os.path.join(folder, fname)):
                skipped.append({"file": rel, "reason": "unexpected sub-folder (not searched)"})
                continue
            stem, ext = os.path.splitext(fname)
            if ext.lower() not in _IMAGE_EXTS:
                skipped.append({"file": rel, "reason": f"not an image file (extension {ext or 'none'!r})"})
                continue
            m = _MASK_RE.match(stem)
            if m:
                masks[m.group("stem")].append((int(m.group("index") or 0), rel))
            elif stem in stems:
                skipped.append({"file": rel, "reason": f"second image named {stem!r} (kept {stems[stem]})"})
            else:
                stems[stem] = rel
        for stem in sorted(set(masks) - set(stems), key=natural_key):
            for _, rel in sorted(masks[stem]):
                skipped.append({"file": rel, "reason": f"mask without an image ({stem}.png is missing)"})
        for stem in sorted(stems, key=natural_key):
            mask_files = [MaskFile(rel, os.path.join(root, rel)) for _, rel in sorted(masks.get(stem, []))]
            images.append(SourceImage(file=stems[stem], path=os.path.join(root, stems[stem]), name=stem,
                                      folder=label, label=label, masks=mask_files,
                                      mask_hint=f"{stem}_mask.png beside the image"))
        found[label] = {"images": len(stems), "mask_files": sum(len(masks.get(s, [])) for s in stems)}
    missing = [c for c in CLASS_FOLDERS if c not in present]
    return SourceScan("busi", [root], images, skipped, report={"found": found, "missing_class_folders": missing},
                      description=DESCRIPTION)


def convert_busi(root: str, out_dir: str, options: Optional[ConvertOptions] = None) -> Dict[str, Any]:
    """Convert BUSI at ``root`` into ``out_dir`` (see module docstring); returns the report dict."""
    return convert(scan_busi(root), out_dir, options)
