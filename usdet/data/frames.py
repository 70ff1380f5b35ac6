"""Hospital scanner frames (stills or DICOM cine) + box annotations -> usdet COCO layout.

``python tools/convert_to_coco.py frames --images DIR --annotations FILE --output OUT --key-file KEY``
(the command line lives in tools/convert_to_coco.py)

Frames are screen captures with the scanner's workspace burned in; each is cropped to the image
region (usdet.data.crop), boxes are shifted exactly into the crop (clipped or dropped when they
leave it, and reported), and the split is by patient (frames of a clip belong to one patient, so
they stay together). Patient and clip IDs, source paths and output names are replaced by keyed
pseudonyms (usdet.data.privacy); without a key the converter refuses to run.

Annotations (boxes in full-frame pixels):

* CSV with columns ``file,x0,y0,x1,y1,label,patient_id[,clip_id]``; x1/y1 exclusive; one row
  per box; a negative frame has one row with the box fields empty. ``file`` is relative to
  ``--images``; a DICOM frame is ``path.dcm#<frame index>`` (a single-frame DICOM may omit it).
  An empty ``patient_id`` for a DICOM file falls back to the header's PatientID.
* COCO JSON (CVAT / Label Studio export): ``images[].file_name`` relative to ``--images``,
  ``annotations[].bbox`` = [x, y, w, h] in full-frame pixels. Patient of an image: its
  ``patient_id`` key (or ``attributes.patient_id``), else the first folder of ``file_name``
  (``PATIENT/CLIP/frame.png``); clip: ``clip_id`` (or ``attributes.clip_id``), else the folder
  between patient and file when there is one. Categories map by name.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from usdet.data.coco import (PixelStats, categories_for, image_moments, invalidate_previous_output,
                             remove_stale_images, write_coco_dataset)
from usdet.data.crop import suppress_marks
from usdet.data.dicom import GREY_SCALE_RULE, DicomReadError, dicom_patient_id, is_dicom_file
from usdet.data.image_io import ImageReadError
from usdet.data.privacy import Pseudonymizer, check_mapping_path, redact
from usdet.data.sources import open_source
from usdet.data.split import SPLITS, split_by_group
from usdet.data.views import find_views
from usdet.utils.io import atomic_write_image, atomic_write_json

logger = logging.getLogger(__name__)

CSV_REQUIRED = ("file", "x0", "y0", "x1", "y1", "label", "patient_id")
NEGATIVE_LABELS = ("", "normal", "negative", "none", "no lesion")


class AnnotationError(ValueError):
    """The annotation file as a whole cannot be used (wrong columns, not JSON...)."""


@dataclass
class FrameRecord:
    """One annotated frame: where it is, whose it is, and its boxes in full-frame pixels."""

    key: str  # "rel/path.png" or "rel/clip.dcm#3" (real path: never written to outputs)
    path: str  # relative path of the source file
    frame: Optional[int]
    patient: str = ""
    clip: str = ""
    boxes: List[Tuple[float, float, float, float]] = field(default_factory=list)
    labels: List[str] = field(default_factory=list)
    skip: str = ""  # why the entry is not converted (e.g. a repeated COCO image id); "" = use it

    @property
    def image_label(self) -> str:
        if not self.labels:
            return "normal"
        return "malignant" if "malignant" in self.labels else self.labels[0]


# ----------------------------------------------------------------------------------------------
# annotation readers
# ----------------------------------------------------------------------------------------------
def _split_key(key: str) -> Tuple[str, Optional[int]]:
    key = key.strip().replace("\\", "/")
    if "#" in key:
        path, _, idx = key.rpartition("#")
        if idx.isdigit():
            return path, int(idx)
    return key, None


def _norm_label(label: str, classes: Sequence[str], where: str) -> str:
    lab = (label or "").strip().lower()
    if classes == ["lesion"]:
        return "lesion" if lab in ("", "lesion") else lab  # keep benign/malignant as image labels
    if lab not in classes:
        raise ValueError(f"{where}: label {label!r} is not one of {list(classes)}")
    return lab


def read_csv_annotations(path: str, classes: Sequence[str]) -> Tuple[List[FrameRecord], List[str]]:
    """Parse the CSV; returns frame records and per-row problems (rows named by number only)."""
    problems: List[str] = []
    frames: Dict[str, FrameRecord] = {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in CSV_REQUIRED if c not in cols]
        if missing:
            raise AnnotationError(f"{path}: CSV lacks column(s) {missing}; expected "
                                  f"{','.join(CSV_REQUIRED)}[,clip_id]")
        for n, raw in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
            where = f"{os.path.basename(path)} row {n}"
            if not row.get("file"):
                problems.append(f"{where}: empty 'file'")
                continue
            rel, idx = _split_key(row["file"])
            key = rel if idx is None else f"{rel}#{idx}"
            rec = frames.get(key)
            if rec is None:
                rec = frames[key] = FrameRecord(key, rel, idx, row.get("patient_id", ""), row.get("clip_id", ""))
            elif row.get("patient_id") and rec.patient and row["patient_id"] != rec.patient:
                problems.append(f"{where}: patient_id differs from an earlier row of the same frame")
                rec.patient = "\x00conflict"
                continue
            rec.patient = rec.patient or row.get("patient_id", "")
            rec.clip = rec.clip or row.get("clip_id", "")
            vals = [row.get(c, "") for c in ("x0", "y0", "x1", "y1")]
            if all(v == "" for v in vals):
                continue  # negative row
            try:
                x0, y0, x1, y1 = (float(v) for v in vals)
                if not (x1 > x0 and y1 > y0):
                    raise ValueError("x1 <= x0 or y1 <= y0")
                if min(x0, y0) < -0.5:
                    raise ValueError("negative coordinates")
                label = _norm_label(row.get("label", ""), classes, where)
            except ValueError as e:
                problems.append(f"{where}: bad box ({e})")
                continue
            rec.boxes.append((x0, y0, x1, y1))
            rec.labels.append(label)
    return list(frames.values()), problems


def _attr(entry: Dict[str, Any], name: str) -> str:
    v = entry.get(name)
    if v in (None, "") and isinstance(entry.get("attributes"), dict):
        v = entry["attributes"].get(name)
    return "" if v is None else str(v).strip()


def read_coco_annotations(path: str, classes: Sequence[str]) -> Tuple[List[FrameRecord], List[str]]:
    """Parse a COCO JSON in full-frame pixels (CVAT / Label Studio export)."""
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise AnnotationError(f"{path}: not a readable COCO JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise AnnotationError(f"{path}: COCO JSON without an 'images' list")
    cats = {c["id"]: str(c.get("name", "")) for c in doc.get("categories", []) if "id" in c}
    problems: List[str] = []
    recs: Dict[int, FrameRecord] = {}
    repeated: List[FrameRecord] = []  # later entries of a repeated image id: reported, not converted
    name = os.path.basename(path)
    for im in doc["images"]:
        fn = str(im.get("file_name", "")).replace("\\", "/").lstrip("./")
        if not fn or "id" not in im:
            problems.append(f"{os.path.basename(path)}: an image entry lacks file_name or id")
            continue
        rel, idx = _split_key(fn)
        parts = rel.split("/")
        patient = _attr(im, "patient_id") or _attr(im, "patient") or (parts[0] if len(parts) > 1 else "")
        clip = _attr(im, "clip_id") or _attr(im, "clip") or (parts[-2] if len(parts) > 2 else "")
        key = rel if idx is None else f"{rel}#{idx}"
        rec = FrameRecord(key, rel, idx, patient, clip)
        if im["id"] in recs:  # annotations name images by id: a second entry would take the first's boxes
            rec.skip = f"image id {im['id']} repeats an earlier image entry of {name}; this entry was skipped"
            problems.append(f"{name}: {rec.skip}")
            repeated.append(rec)
            continue
        recs[im["id"]] = rec
    for n, a in enumerate(doc.get("annotations", [])):
        where = f"{os.path.basename(path)} annotation {a.get('id', n)}"
        rec = recs.get(a.get("image_id"))
        if rec is None:
            problems.append(f"{where}: unknown image_id")
            continue
        try:
            x, y, w, h = (float(v) for v in a["bbox"])
            if not all(math.isfinite(v) for v in (x, y, w, h)):
                raise ValueError("bbox has a non-finite value")
            if w <= 0 or h <= 0:
                raise ValueError("empty box")
            if a.get("category_id") not in cats:
                raise ValueError(f"category_id {a.get('category_id')!r} is not one of the categories "
                                 f"{sorted(cats)}")
            label = _norm_label(cats[a["category_id"]], classes, where)
        except (KeyError, TypeError, ValueError) as e:
            problems.append(f"{where}: bad box ({e})")
            continue
        rec.boxes.append((x, y, x + w, y + h))
        rec.labels.append(label)
    keys = Counter(r.key for r in recs.values())
    dups = [k for k, c in keys.items() if c > 1]
    if dups:
        problems.append(f"{len(dups)} file names appear in more than one image entry; their later entries were ignored")
        seen, out = set(), []
        for r in recs.values():
            if r.key not in seen:
                seen.add(r.key)
                out.append(r)
        return out + repeated, problems
    return list(recs.values()) + repeated, problems


def read_annotations(path: str, classes: Sequence[str]) -> Tuple[List[FrameRecord], List[str]]:
    """CSV or COCO JSON by extension (``.csv`` / ``.json``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: annotation file not found")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".csv":
        return read_csv_annotations(path, classes)
    if ext == ".json":
        return read_coco_annotations(path, classes)
    raise AnnotationError(f"{path}: annotations must be .csv or .json (COCO)")


# ----------------------------------------------------------------------------------------------
# per-file work (runs in worker processes)
# ----------------------------------------------------------------------------------------------
def shift_box(box: Sequence[float], crop: Sequence[int], min_visible: float) -> Tuple[Optional[List[float]], str]:
    """Full-frame [x0, y0, x1, y1] -> crop-relative COCO [x, y, w, h]; ("kept"|"clipped"|"dropped")."""
    x0, y0, x1, y1 = (float(v) for v in box)
    cx0, cy0, cx1, cy1 = (float(v) for v in crop)
    bx0, by0, bx1, by1 = max(x0, cx0), max(y0, cy0), min(x1, cx1), min(y1, cy1)
    area = (x1 - x0) * (y1 - y0)
    if bx1 <= bx0 or by1 <= by0:
        return None, "dropped"
    vis = (bx1 - bx0) * (by1 - by0) / area if area > 0 else 0.0
    if vis < min_visible:
        return None, "dropped"
    status = "kept" if (bx0, by0, bx1, by1) == (x0, y0, x1, y1) else "clipped"
    return [bx0 - cx0, by0 - cy0, bx1 - bx0, by1 - by0], status


def _view_file_name(file_name: str, view: Optional[int]) -> str:
    """``images/<split>/<name>.png`` -> ``images/<split>/<name>_view<k>.png`` for view k of a multi-view frame."""
    if view is None:
        return file_name
    stem, ext = os.path.splitext(file_name)
    return f"{stem}_view{view}{ext}"


def _process_file(task: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Read one source file, crop its annotated frames (each view of a multi-view frame on its own),
    write them; one result per frame, with one entry in ``views`` per crop."""
    path, frames = task["path"], task["frames"]  # frames: {frame index or None: job}
    out: List[Dict[str, Any]] = []
    want = {(0 if (i is None and task["dicom"]) else i) for i in frames}
    done = set()
    try:
        src = open_source(path)
        for idx, rgb in src:
            if idx not in want:
                if task["dicom"] and idx is not None and idx > max(i for i in want if i is not None):
                    break
                continue
            job = frames.get(idx) if idx in frames else frames.get(None)
            done.add(idx)
            res: Dict[str, Any] = {"job": job["id"], "status": "ok", "views": [], "grey_scale": src.grey_scale_method}
            crops = find_views(rgb, src.regions)
            for k, crop in enumerate(crops):
                view = k if len(crops) > 1 else None
                v: Dict[str, Any] = {"view": view, "crop": crop.to_dict(),
                                     "file_name": _view_file_name(job["file_name"], view)}
                res["views"].append(v)
                if crop.box is None:
                    v["status"] = "refused"
                    continue
                x0, y0, x1, y1 = crop.box
                img = np.ascontiguousarray(rgb[y0:y1, x0:x1])
                if task["suppress"]:
                    img, changed = suppress_marks(img)
                    v["marks_changed"] = changed
                atomic_write_image(os.path.join(task["out_dir"], v["file_name"]), img)
                v.update(status="ok", width=int(img.shape[1]), height=int(img.shape[0]),
                         moments=image_moments(img) if job["split"] == "train" else None)
            out.append(res)
    except ImageReadError as e:  # DicomReadError included; .reason holds no path
        for i, job in frames.items():
            if (0 if (i is None and task["dicom"]) else i) not in done:
                out.append({"job": job["id"], "status": "failed", "reason": e.reason})
        return out
    for i, job in frames.items():
        if (0 if (i is None and task["dicom"]) else i) not in done:
            reason = "frame index not in file" if task["dicom"] else "not decoded"
            out.append({"job": job["id"], "status": "failed", "reason": reason})
    return out


def _boxes_by_view(boxes: Sequence[Sequence[float]], crops: Sequence[Optional[Sequence[int]]]) -> List[Optional[int]]:
    """For each full-frame box, the view whose crop holds most of it (None: it lies in no view)."""
    out: List[Optional[int]] = []
    for x0, y0, x1, y1 in boxes:
        best, best_area = None, 0.0
        for k, c in enumerate(crops):
            if c is None:
                continue
            area = max(0.0, min(x1, c[2]) - max(x0, c[0])) * max(0.0, min(y1, c[3]) - max(y0, c[1]))
            if area > best_area:
                best, best_area = k, area
        out.append(best)
    return out


# ----------------------------------------------------------------------------------------------
# conversion
# ----------------------------------------------------------------------------------------------
def convert_frames(images_dir: str, annotations: str, out_dir: str, key: bytes, *,
                   classes: Sequence[str] = ("lesion",), fractions=(0.7, 0.15, 0.15), seed: int = 0,
                   workers: int = 1, mapping: Optional[str] = None, suppress: bool = False,
                   min_visible: float = 0.5, progress: bool = True, folds: int = 0, fold: int = 0,
                   val_fraction: float = 0.15) -> Dict[str, Any]:
    """Convert; returns the report (also written to OUT/report.json). See the module docstring."""
    classes = list(classes)
    if not os.path.isdir(images_dir):
        raise NotADirectoryError(f"{images_dir}: --images is not a folder")
    if mapping:
        check_mapping_path(mapping, out_dir)
    pseudo = Pseudonymizer(key)
    records, problems = read_annotations(annotations, classes)
    real_ids: List[str] = []  # everything that must never reach an output

    # patients: CSV/COCO value, else the DICOM header; frames without any patient cannot be split safely
    usable: List[FrameRecord] = []
    failed: List[Dict[str, str]] = []
    missing_patient = 0
    for rec in sorted(records, key=lambda r: r.key):
        src = os.path.join(images_dir, rec.path)
        real_ids.extend([rec.path, rec.patient, rec.clip])
        if rec.skip:
            failed.append({"source": pseudo(rec.key, "img"), "reason": rec.skip})
            continue
        if not os.path.isfile(src):
            failed.append({"source": pseudo(rec.key, "img"), "reason": "file listed in the annotations not found"})
            continue
        if rec.patient == "\x00conflict":
            failed.append({"source": pseudo(rec.key, "img"), "reason": "conflicting patient_id rows"})
            continue
        if not rec.patient and is_dicom_file(src):
            try:
                rec.patient = dicom_patient_id(src) or ""
            except DicomReadError:
                rec.patient = ""
            real_ids.append(rec.patient)
        if not rec.patient:
            missing_patient += 1
            failed.append({"source": pseudo(rec.key, "img"), "reason": "no patient_id (needed for a patient-level split)"})
            continue
        usable.append(rec)

    keys = [r.key for r in usable]
    groups = [pseudo(r.patient, "pt") for r in usable]
    split_of, _, split_info = split_by_group(keys, groups, [r.image_label for r in usable], fractions, seed,
                                             folds, fold, val_fraction)

    jobs: Dict[int, Dict[str, Any]] = {}
    by_file: Dict[str, Dict[Optional[int], Dict[str, Any]]] = defaultdict(dict)
    for i, rec in enumerate(usable):
        name = pseudo(rec.key, "img")
        split = split_of[rec.key]
        jobs[i] = {"id": i, "rec": rec, "split": split, "name": name,
                   "file_name": f"images/{split}/{name}.png", "patient": groups[i],
                   "clip": pseudo(f"{rec.patient}\x00{rec.clip}", "clip") if rec.clip else ""}
        by_file[rec.path][rec.frame] = {k: jobs[i][k] for k in ("id", "split", "file_name")}
    # an earlier run's JSONs go before any image is replaced: a killed run leaves nothing that looks valid
    invalidate_previous_output(out_dir)
    tasks = [{"path": os.path.join(images_dir, p), "frames": fr, "out_dir": out_dir, "suppress": suppress,
              "dicom": is_dicom_file(os.path.join(images_dir, p))} for p, fr in sorted(by_file.items())]

    results: Dict[int, Dict[str, Any]] = {}
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="frames", unit="frame", disable=not progress, file=sys.stderr)
    if workers > 1 and len(tasks) > 1:
        from multiprocessing import get_context

        with get_context("spawn").Pool(workers) as pool:
            for res in pool.imap_unordered(_process_file, tasks, chunksize=1):
                for r in res:
                    results[r["job"]] = r
                bar.update(len(res))
    else:
        for t in tasks:
            res = _process_file(t)
            for r in res:
                results[r["job"]] = r
            bar.update(len(res))
    bar.close()

    # assemble in key order: ids and files do not depend on worker timing
    images_by_split: Dict[str, List[Dict[str, Any]]] = {s: [] for s in SPLITS}
    anns_by_split: Dict[str, List[Dict[str, Any]]] = {s: [] for s in SPLITS}
    stats = PixelStats()
    box_counts = Counter()
    refused: List[Dict[str, Any]] = []
    marks = 0
    multi_view = 0
    grey_scale: Dict[str, Optional[str]] = {}  # source file -> how its >8-bit data was scaled (DICOM)
    cat_id = {name: i + 1 for i, name in enumerate(classes)}
    next_img, next_ann = 1, 1
    for i in sorted(jobs, key=lambda j: jobs[j]["rec"].key):
        job, res = jobs[i], results.get(i, {"status": "failed", "reason": "not processed"})
        rec = job["rec"]
        if res["status"] == "failed":
            failed.append({"source": job["name"], "reason": redact(str(res.get("reason", "")), real_ids)})
            continue
        grey_scale[rec.path] = res.get("grey_scale")
        views = res["views"]
        if len(views) > 1:
            multi_view += 1
            owner = _boxes_by_view(rec.boxes, [v["crop"]["box"] for v in views])
            box_counts["dropped"] += sum(1 for o in owner if o is None)  # outside every view
        else:
            owner = [0] * len(rec.boxes)
        for k, v in enumerate(views):
            if v["status"] == "refused":
                refused.append({"source": job["name"], **({} if v["view"] is None else {"view": v["view"]}),
                                "reason": v["crop"]["reason"], "confidence": v["crop"]["confidence"]})
                continue
            crop = v["crop"]["box"]
            entry = {"id": next_img, "file_name": v["file_name"], "width": v["width"], "height": v["height"],
                     "source_file": job["name"], "crop_box": crop, "group": job["patient"],
                     "patient": job["patient"], "label": rec.image_label}
            if v["view"] is not None:
                entry["view"] = v["view"]  # views of one frame share source_file, group and split
            if job["clip"]:
                entry["clip"] = job["clip"]
            marks += int(v.get("marks_changed", 0))
            for box, label, o in zip(rec.boxes, rec.labels, owner):
                if o != k:
                    continue
                bbox, status = shift_box(box, crop, min_visible)
                box_counts[status] += 1
                if bbox is None:
                    continue
                cid = cat_id["lesion"] if classes == ["lesion"] else cat_id[label]
                anns_by_split[job["split"]].append({
                    "id": next_ann, "image_id": next_img, "category_id": cid,
                    "bbox": [round(val, 3) for val in bbox], "area": round(bbox[2] * bbox[3], 3), "iscrowd": 0})
                next_ann += 1
            images_by_split[job["split"]].append(entry)
            if job["split"] == "train" and v.get("moments") is not None:
                stats.add_moments(*v["moments"])
            next_img += 1

    patients = {s: sorted({im["patient"] for im in images_by_split[s]}) for s in SPLITS}
    counts: Dict[str, Any] = {s: len(images_by_split[s]) for s in SPLITS}
    counts.update(images=sum(counts[s] for s in SPLITS), patients=len(set().union(*patients.values())),
                  patients_per_split={s: len(patients[s]) for s in SPLITS},
                  annotated_frames=len(records), refused=len(refused), failed=len(failed),
                  boxes_kept=box_counts["kept"], boxes_clipped=box_counts["clipped"],
                  boxes_dropped=box_counts["dropped"],
                  boxes_per_split={s: len(anns_by_split[s]) for s in SPLITS}, multi_view_frames=multi_view)
    report = {
        "dataset": "hospital frames",
        "classes": classes,
        "split": {**split_info, "by": "patient (pseudonym)"},
        "pseudonym_key_id": pseudo.key_id,
        "counts": counts,
        "refused": refused,
        "failed": failed,
        "annotation_problems": [redact(p, real_ids) for p in problems],
        "crop": {"suppress_marks": bool(suppress), "marks_pixels_changed": marks, "min_visible": min_visible,
                 "source": "DICOM ultrasound regions where the header has them, else the pixel cropper; a "
                           "dual-view frame gives one image per view (same source_file, split and patient), "
                           "each box going to the view holding most of it"},
        "grey_scale": {"rule": GREY_SCALE_RULE,
                       "dicom_files": dict(Counter(m for m in grey_scale.values() if m is not None))},
        "privacy": "patient/clip IDs, source paths and file names are HMAC-SHA256 pseudonyms; no mapping is "
                   "stored in this folder",
    }
    # images of an earlier run (other split, other frames) and killed runs' temp files go
    remove_stale_images(out_dir, SPLITS, {im["file_name"] for s in SPLITS for im in images_by_split[s]})
    if mapping:  # before the dataset JSONs: report.json, written last, marks a finished conversion
        mp = {"pseudonym_key_id": pseudo.key_id,
              "files": {jobs[i]["name"]: jobs[i]["rec"].key for i in sorted(jobs)},
              "patients": {groups[i]: usable[i].patient for i in range(len(usable))},
              "clips": {jobs[i]["clip"]: usable[i].clip for i in sorted(jobs) if jobs[i]["clip"]}}
        atomic_write_json(mapping, mp)
    write_coco_dataset(out_dir, images_by_split, anns_by_split, categories_for(classes), report=report,
                       pixel_stats=stats.result("train"),
                       info={"description": "hospital frames (pseudonymized)", "pseudonym_key_id": pseudo.key_id})
    return report
