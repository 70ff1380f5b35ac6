"""BUS-BRA (Gómez-Flores et al., Medical Physics 2024): its published layout, for the converter core.

``ROOT/Images/bus_NNNN-{l,r,s}.png``, ``ROOT/Masks/mask_NNNN-{l,r,s}.png`` (one binary mask per
image, same size), ``ROOT/bus_data.csv`` (``ID,Case,Histology,Pathology,BIRADS,Device,Width,
Height,Side,BBOX``; ID = image stem, Case = patient, Pathology benign|malignant, Device = scanner)
and the published partitions ``5-fold-cv.csv`` / ``10-fold-cv.csv`` (``ID,Pathology,kFold,...``).

Group = Case: two views of one patient never straddle splits. With a folds file and a test
fold, the published partition is used as is (its test fold is the test split; the rest is split
into train/val by group). The image file is the truth for its size: a ``Width``/``Height``
that disagrees is a note in report.json, and the image is still converted. ``Case`` is the
publisher's own de-identified patient number and is written as ``patient``.
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Dict, List, Optional

from usdet.data.convert import MaskFile, SourceImage, SourceScan, natural_key
from usdet.data.tables import TableError, duplicates, read_table, value

TABLE = "bus_data.csv"
REQUIRED = ("ID", "Pathology")
OPTIONAL = {"Case": "patient groups (each image is its own group)", "Histology": "histology",
            "BIRADS": "birads", "Device": "device", "Width": "size check", "Height": "size check"}
LABELS = ("benign", "malignant")
DESCRIPTION = "BUS-BRA (Gómez-Flores et al. 2024, Medical Physics 51:3110), converted by usdet"


def _mask_name(image_id: str) -> str:
    """``bus_0001-l`` -> ``mask_0001-l.png`` (the published naming)."""
    return "mask_" + (image_id[4:] if image_id.startswith("bus_") else image_id) + ".png"


def read_folds(root: str, folds_file: str) -> Dict[str, int]:
    """{image ID: published fold} from ``5-fold-cv.csv`` / ``10-fold-cv.csv`` (relative paths from ROOT)."""
    path = folds_file if os.path.isabs(folds_file) else os.path.join(root, folds_file)
    _, rows = read_table(path, ("ID", "kFold"))
    dup = duplicates(rows, "ID")
    if dup:
        first = sorted(dup)[0]
        raise TableError(f"{os.path.basename(path)}: ID {first} is listed in rows {dup[first]} (and "
                         f"{len(dup) - 1} more duplicate IDs): the partition is ambiguous")
    folds = {}
    for n, row in rows:
        try:
            folds[row["ID"]] = int(row["kFold"])
        except ValueError:
            raise TableError(f"{os.path.basename(path)} row {n}: kFold {row['kFold']!r} is not an integer") from None
    return folds


def scan_busbra(root: str, folds_file: Optional[str] = None) -> SourceScan:
    """Pair bus_data.csv's rows with images and masks; every problem becomes one line of report.json."""
    if not os.path.isdir(root):
        raise TableError(f"ROOT {root!r} is not a folder; expected BUS-BRA: Images/, Masks/, {TABLE}")
    for sub in ("Images", "Masks"):
        if not os.path.isdir(os.path.join(root, sub)):
            raise TableError(f"ROOT {root!r} has no {sub}/ folder; expected BUS-BRA: Images/bus_NNNN-l.png, "
                             f"Masks/mask_NNNN-l.png, {TABLE}")
    header, rows = read_table(os.path.join(root, TABLE), REQUIRED)
    notes = [{"file": TABLE, "note": f"no column {col!r}: {what}"} for col, what in OPTIONAL.items()
             if col not in header]
    folds = read_folds(root, folds_file) if folds_file else None
    image_files = {os.path.splitext(f)[0]: f for f in os.listdir(os.path.join(root, "Images"))
                   if f.lower().endswith(".png") and not f.startswith(".")}
    mask_files = {f for f in os.listdir(os.path.join(root, "Masks")) if not f.startswith(".")}
    dup_ids = duplicates(rows, "ID")
    skipped: List[Dict[str, str]] = []
    images: List[SourceImage] = []
    listed: set = set()
    for n, row in rows:
        where = f"{TABLE} row {n}"
        image_id = row["ID"]
        listed.add(image_id)
        if not image_id:
            skipped.append({"file": where, "reason": "empty ID"})
            continue
        if image_id in dup_ids:
            skipped.append({"file": where, "reason": f"duplicate ID {image_id}: listed in rows {dup_ids[image_id]}; "
                                                     "none of them is used"})
            continue
        label = row["Pathology"].strip().lower()
        if label not in LABELS:
            skipped.append({"file": where, "reason": f"unknown label {row['Pathology']!r} in column Pathology "
                                                     f"(expected one of {list(LABELS)})"})
            continue
        if image_id not in image_files:
            skipped.append({"file": where, "reason": f"ID {image_id} has no image Images/{image_id}.png"})
            continue
        image_rel = f"Images/{image_files[image_id]}"
        mask = _mask_name(image_id)
        if mask not in mask_files:
            skipped.append({"file": f"Masks/{mask}", "reason": f"mask missing for {image_rel} (image not converted)"})
            continue
        case = value(row, "Case")
        attrs = {"patient": case or None, "device": value(row, "Device") or None,
                 "birads": value(row, "BIRADS") or None, "histology": value(row, "Histology") or None}
        size = None
        try:
            size = (int(float(row["Width"])), int(float(row["Height"])))
        except (KeyError, ValueError):
            pass
        images.append(SourceImage(
            file=image_rel, path=os.path.join(root, image_rel), name=image_id, folder=label, label=label,
            masks=[MaskFile(f"Masks/{mask}", os.path.join(root, "Masks", mask))],
            group=case or None, attrs=attrs, mask_hint=f"Masks/{mask}", strict_masks=True,
            expected_size=size, size_source=f"{where} (Width, Height)",
            fold=None if folds is None else folds.get(image_id)))
    for stem in sorted(set(image_files) - listed, key=natural_key):
        skipped.append({"file": f"Images/{image_files[stem]}", "reason": f"image without a row in {TABLE}"})
    known_masks = {_mask_name(i) for i in listed}
    for m in sorted(mask_files - known_masks, key=natural_key):
        skipped.append({"file": f"Masks/{m}", "reason": f"mask of no ID in {TABLE}"})
    report = {"table": TABLE, "rows": len(rows)}
    if folds is not None:
        report["folds_file"] = os.path.basename(folds_file)
        report["fold_sizes"] = {str(k): v for k, v in sorted(Counter(folds.values()).items())}
    return SourceScan("busbra", [root], images, skipped, notes, report=report, description=DESCRIPTION)

