"""Generic image + mask folders (a user's own set, or public sets such as BUS-UCLM), for the converter core.

Images are found under ``images_dir`` (recursively); an image's masks are the files under
``masks_dir`` that match ``mask_pattern`` (``{stem}`` = image name without extension, ``{dir}`` =
its sub-folder, shell wildcards allowed; several matches = several masks, one box each). With
``colors`` ({(r, g, b): class}), masks are colour-coded: each connected region of a listed colour
is one box of that class. An optional table (CSV or .xlsx, one row per image) adds the image
label, the patient and any attribute columns as image keys. Rows name images by their path under
``images_dir``: two sub-folders may both hold ``img1.png``, so a bare name that matches several
images is refused instead of labelling one of them with the other's row.

Patient values in a user's table may be real identifiers: they are written only as keyed
pseudonyms (``usdet.data.privacy``, the hospital converter's key), never as given.
"""
from __future__ import annotations

import fnmatch
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from usdet.data.convert import MaskFile, SourceImage, SourceScan, natural_key
from usdet.data.image_io import IMAGE_EXTENSIONS
from usdet.data.tables import TableError, duplicates, read_table, value

LABELS = ("benign", "malignant", "normal", "lesion")


def parse_mask_colors(text: str) -> Dict[Tuple[int, int, int], str]:
    """``"0,255,0=benign;255,0,0=malignant"`` -> {(0, 255, 0): "benign", (255, 0, 0): "malignant"}."""
    colors: Dict[Tuple[int, int, int], str] = {}
    for part in [p for p in text.split(";") if p.strip()]:
        rgb, sep, name = part.partition("=")
        try:
            color = tuple(int(v) for v in rgb.split(","))
        except ValueError:
            color = ()
        if not sep or len(color) != 3 or not all(0 <= v <= 255 for v in color) or not name.strip():
            raise ValueError(f"--mask-colors {part!r}: expected R,G,B=class with 0..255 values, e.g. "
                             "'0,255,0=benign;255,0,0=malignant'")
        if color == (0, 0, 0):
            raise ValueError("--mask-colors: black (0,0,0) is the background and cannot be a class")
        colors[color] = name.strip().lower()  # type: ignore[index]
    if not colors:
        raise ValueError(f"--mask-colors {text!r}: no colour given")
    return colors


def _walk(folder: str) -> List[str]:
    found = []
    for d, dirs, files in os.walk(folder):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        for f in files:
            if not f.startswith("."):
                found.append(os.path.relpath(os.path.join(d, f), folder).replace(os.sep, "/"))
    return sorted(found, key=natural_key)


def _table_index(images_rel: Sequence[str]) -> Callable[[str], List[str]]:
    """``find(ref) -> [image, ...]``: the images a table's image ID names.

    Keyed by the path under ``--images`` (with or without extension) first; a bare file name or
    stem is accepted only where no path matches, and may match several images (``a/img1.png``,
    ``b/img1.png``): the caller refuses that rather than picking one.
    """
    by_path: Dict[str, List[str]] = {}
    by_name: Dict[str, List[str]] = {}
    for rel in images_rel:
        by_path.setdefault(os.path.splitext(rel)[0], []).append(rel)
        base = os.path.basename(rel)
        for key in dict.fromkeys([base, os.path.splitext(base)[0]]):
            by_name.setdefault(key, []).append(rel)
    exact = set(images_rel)

    def find(ref: str) -> List[str]:
        ref = ref.strip().replace("\\", "/")
        while ref.startswith("./"):
            ref = ref[2:]
        if ref in exact:
            return [ref]
        stem = os.path.splitext(ref)[0]
        if stem in by_path:
            return list(by_path[stem])
        if "/" in ref:
            return []
        return list(by_name.get(ref) or by_name.get(stem) or [])

    return find


def scan_mask_folders(images_dir: str, masks_dir: str, mask_pattern: str = "{stem}_mask*.png", *,
                      colors: Optional[Dict[Tuple[int, int, int], str]] = None, table: Optional[str] = None,
                      image_column: str = "image", label_column: str = "label", patient_column: str = "patient",
                      attributes: Sequence[str] = (), key_file: Optional[str] = None,
                      dataset: str = "masks") -> SourceScan:
    """Pair images with their masks (and table rows); every file or row not used is listed with its reason."""
    for what, d in (("--images", images_dir), ("--masks", masks_dir)):
        if not os.path.isdir(d):
            raise TableError(f"{what} {d!r} is not a folder")
    if "{stem}" not in mask_pattern:
        raise ValueError(f"--mask-pattern {mask_pattern!r} must contain {{stem}}")
    skipped: List[Dict[str, str]] = []
    notes: List[Dict[str, str]] = []
    mask_rel = _walk(masks_dir)
    same = os.path.realpath(images_dir) == os.path.realpath(masks_dir)
    candidates = []
    for rel in _walk(images_dir):
        if os.path.splitext(rel)[1].lower() in IMAGE_EXTENSIONS:
            candidates.append(rel)
        elif not same or rel not in mask_rel:
            skipped.append({"file": rel, "reason": f"not an image file (extension {os.path.splitext(rel)[1]!r})"})
    masks_of: Dict[str, List[str]] = {}
    for rel in candidates:
        d, base = os.path.split(rel)
        pattern = mask_pattern.format(stem=os.path.splitext(base)[0], dir=d).lstrip("/")
        masks_of[rel] = [m for m in mask_rel if fnmatch.fnmatchcase(m, pattern) and not (same and m == rel)]
    used_masks = {m for ms in masks_of.values() for m in ms}
    images_rel = [r for r in candidates if not (same and r in used_masks)]
    for m in mask_rel:
        if m not in used_masks and not (same and m in images_rel) and os.path.splitext(m)[1].lower() in IMAGE_EXTENSIONS:
            skipped.append({"file": f"masks/{m}" if not same else m, "reason": "mask matches no image"})

    rows_by_image: Dict[str, Tuple[int, Dict[str, str]]] = {}
    pseudo = None
    table_name = os.path.basename(table) if table else ""
    if table:
        header, rows = read_table(table, [image_column])
        for col in [label_column, patient_column, *attributes]:
            if col not in header:
                notes.append({"file": table_name, "note": f"no column {col!r}: not read"})
        if patient_column in header:
            from usdet.data.privacy import Pseudonymizer, load_key

            pseudo = Pseudonymizer(load_key(key_file))  # no key: PseudonymKeyError, nothing written
        dup = duplicates(rows, image_column)
        find = _table_index(images_rel)
        row_of: Dict[str, int] = {}
        for n, row in rows:
            ref = row[image_column]
            where = f"{table_name} row {n}"
            found = find(ref)
            if len(found) > 1:  # a bare name shared by images in several sub-folders: no guessing
                raise TableError(f"{table} row {n}: image {ref!r} is ambiguous, it matches {' and '.join(found)} "
                                 "under --images; name each image by its path under --images in the "
                                 f"{image_column!r} column (e.g. {found[0]!r})")
            image = found[0] if found else None
            if ref in dup:
                skipped.append({"file": where, "reason": f"duplicate ID {ref}: listed in rows {dup[ref]}; none of "
                                                         "them is used"})
                rows_by_image[image or ref] = (n, {})
                continue
            if image is None:
                skipped.append({"file": where, "reason": f"image {ref!r} not found under --images"})
                continue
            if image in row_of:  # e.g. 'sub/img1.png' and 'sub/img1': two rows for one image
                skipped.append({"file": where, "reason": f"rows {row_of[image]} and {n} both name {image}; none of "
                                                         "them is used"})
                rows_by_image[image] = (n, {})
                continue
            row_of[image] = n
            rows_by_image[image] = (n, row)

    images: List[SourceImage] = []
    for rel in images_rel:
        label: Optional[str] = None
        attrs: Dict[str, object] = {}
        group = None
        if table:
            if rel not in rows_by_image:
                skipped.append({"file": rel, "reason": f"image without a row in {table_name}"})
                continue
            n, row = rows_by_image[rel]
            if not row:  # a duplicated ID, reported above
                continue
            lab = value(row, label_column).lower()
            if lab and lab not in LABELS:
                skipped.append({"file": f"{table_name} row {n}", "reason": f"unknown label {row[label_column]!r} "
                                                                           f"(expected one of {list(LABELS)})"})
                continue
            label = lab or None
            if value(row, patient_column) and pseudo is not None:
                group = pseudo(value(row, patient_column), "pt")
                attrs["patient"] = group
            for col in attributes:
                if col in row:
                    attrs[col] = value(row, col) or None
        kind = [MaskFile(m if same else f"masks/{m}", os.path.join(masks_dir, m), colors=colors)
                for m in masks_of[rel]]
        stem = os.path.splitext(os.path.basename(rel))[0]
        images.append(SourceImage(file=rel, path=os.path.join(images_dir, rel), name=stem,
                                  folder=os.path.dirname(rel) or "all", label=label, masks=kind, group=group,
                                  attrs=attrs, mask_hint=f"a mask matching {mask_pattern!r}", strict_masks=True))
    report = {"mask_pattern": mask_pattern, "table": table_name or None}
    if pseudo is not None:
        report["pseudonym_key_id"] = pseudo.key_id
    return SourceScan(dataset, [images_dir, masks_dir], images, skipped, notes, report=report,
                      description=f"{dataset} (image + mask folders), converted by usdet")
