"""BrEaST-Lesions-USG (Pawłowska et al., Scientific Data 2024): its published layout, for the converter core.

``ROOT/BrEaST-Lesions-USG-clinical-data-*.xlsx`` (sheet 1: one row per case) and
``ROOT/BrEaST-Lesions_USG-images_and_masks/caseNNN.png`` with ``caseNNN_tumor.png`` (the lesion)
and ``caseNNN_otherK.png`` (other suspicious regions, e.g. cysts). The spreadsheet is the truth
for which files belong to a case, its label (``Classification``: benign / malignant / normal,
normals kept as negatives) and the attributes a researcher slices by.

The ``_other`` masks are neither plainly lesions nor plainly background; ``other_masks``
decides: ``ignore`` (default) writes them as COCO ignore regions (``iscrowd: 1``, category of
the image's label), ``lesion`` as boxes like the tumour, ``skip`` leaves them out.

Patient: one image per case, and ``CaseID`` is the publisher's own case number (the public
archive's de-identified index, already in every file name), so ``patient`` is written as
``caseNNN``; no other clinical field that could identify a person (age, symptoms) is written.
"""
from __future__ import annotations

import glob
import os
import re
from typing import Dict, List, Optional

from usdet.data.convert import MaskFile, SourceImage, SourceScan, natural_key
from usdet.data.tables import TableError, duplicates, read_table, value

IMAGE_FOLDER = "BrEaST-Lesions_USG-images_and_masks"
REQUIRED = ("CaseID", "Image_filename", "Classification")
OPTIONAL = {"Mask_tumor_filename": "lesion masks", "Mask_other_filename": "other-region masks",
            "Pixel_size": "pixel_size_cm", "BIRADS": "birads", "Verification": "verification",
            "Diagnosis": "histology"}
LABELS = ("benign", "malignant", "normal")
OTHER_CHOICES = ("ignore", "lesion", "skip")
DESCRIPTION = ("BrEaST-Lesions-USG (Pawłowska et al. 2024, Scientific Data 11:148; TCIA doi:10.7937/9WKK-Q141), "
               "converted by usdet")
_CASE_FILE = re.compile(r"^case\d+(_tumor|_other\d*)?\.png$", re.IGNORECASE)


def find_spreadsheet(root: str) -> str:
    if not os.path.isdir(root):
        raise TableError(f"ROOT {root!r} is not a folder; expected the BrEaST-Lesions-USG release: "
                         f"the clinical .xlsx and {IMAGE_FOLDER}/")
    found = sorted(glob.glob(os.path.join(root, "*.xlsx")))
    if len(found) != 1:
        raise TableError(f"ROOT {root!r} holds {len(found)} .xlsx files ({[os.path.basename(f) for f in found]}); "
                         f"expected exactly one, the clinical spreadsheet BrEaST-Lesions-USG-clinical-data-*.xlsx")
    if not os.path.isdir(os.path.join(root, IMAGE_FOLDER)):
        raise TableError(f"ROOT {root!r} has no {IMAGE_FOLDER}/ folder (caseNNN.png with caseNNN_tumor.png masks)")
    return found[0]


def _float(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


def scan_breast(root: str, other_masks: str = "ignore") -> SourceScan:
    """Read the spreadsheet and pair each case with its image and masks; every problem becomes one line."""
    if other_masks not in OTHER_CHOICES:
        raise ValueError(f"--other-masks must be one of {OTHER_CHOICES}, got {other_masks!r}")
    sheet = find_spreadsheet(root)
    sheet_name = os.path.basename(sheet)
    header, rows = read_table(sheet, REQUIRED)
    notes = [{"file": sheet_name, "note": f"no column {col!r}: {what} not read"}
             for col, what in OPTIONAL.items() if col not in header]
    folder = os.path.join(root, IMAGE_FOLDER)
    on_disk = {f for f in os.listdir(folder) if not f.startswith(".")}
    skipped: List[Dict[str, str]] = []
    used: set = set()
    dup_ids = duplicates(rows, "CaseID")
    dup_images = duplicates(rows, "Image_filename")
    images: List[SourceImage] = []

    def rel(name: str) -> str:
        return f"{IMAGE_FOLDER}/{name}"

    for n, row in rows:
        where = f"{sheet_name} row {n}"
        case_id, image_name = row["CaseID"], row["Image_filename"]
        if not case_id or not image_name:
            skipped.append({"file": where, "reason": "empty CaseID or Image_filename"})
            continue
        if case_id in dup_ids or image_name in dup_images:
            rows_of = dup_ids.get(case_id) or dup_images.get(image_name)
            skipped.append({"file": where, "reason": f"duplicate ID: CaseID {case_id} / {image_name} is listed in "
                                                     f"rows {rows_of}; none of them is used"})
            used.add(image_name)
            continue
        label = row["Classification"].strip().lower()
        used.add(image_name)
        tumor = [t.strip() for t in value(row, "Mask_tumor_filename").split("&") if t.strip()]
        others = [t.strip() for t in value(row, "Mask_other_filename").split("&") if t.strip()]
        used.update(tumor + others)
        if label not in LABELS:
            skipped.append({"file": where, "reason": f"unknown label {row['Classification']!r} in column "
                                                     f"Classification (expected one of {list(LABELS)})"})
            continue
        if image_name not in on_disk:
            skipped.append({"file": rel(image_name), "reason": f"listed in {where} but not found"})
            continue
        missing = [m for m in tumor + (others if other_masks != "skip" else []) if m not in on_disk]
        if missing:
            skipped.append({"file": rel(missing[0]), "reason": f"mask missing: listed for {image_name} in {where} "
                                                               "but not found (image not converted)"})
            continue
        masks = [MaskFile(rel(m), os.path.join(folder, m)) for m in tumor]
        if other_masks == "skip":
            skipped += [{"file": rel(m), "reason": "other-region mask not used (--other-masks skip)"} for m in others]
        else:
            role = "ignore" if other_masks == "ignore" else "lesion"
            masks += [MaskFile(rel(m), os.path.join(folder, m), role=role) for m in others]
        try:
            patient = f"case{int(case_id):03d}"
        except ValueError:
            patient = re.sub(r"[^A-Za-z0-9_-]+", "_", case_id)
        attrs = {"patient": patient}
        pixel = _float(value(row, "Pixel_size"))
        attrs.update({"birads": value(row, "BIRADS") or None, "pixel_size_cm": pixel,
                      "histology": value(row, "Diagnosis") or None,
                      "verification": value(row, "Verification") or None})
        stem = os.path.splitext(image_name)[0]
        images.append(SourceImage(file=rel(image_name), path=os.path.join(folder, image_name), name=stem,
                                  folder=label, label=label, masks=masks, group=patient, attrs=attrs,
                                  mask_hint=f"a Mask_tumor_filename for {where}", strict_masks=True))
    for f in sorted(on_disk - used, key=natural_key):
        kind = "mask" if re.search(r"_(tumor|other\d*)\.png$", f, re.IGNORECASE) else "image"
        reason = (f"{kind} without a row in {sheet_name}" if _CASE_FILE.match(f)
                  else f"not part of the release layout (not listed in {sheet_name})")
        skipped.append({"file": rel(f), "reason": reason})
    return SourceScan("breast", [root], images, skipped, notes,
                      report={"table": sheet_name, "rows": len(rows), "other_masks": other_masks},
                      description=DESCRIPTION)
