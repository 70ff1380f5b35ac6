"""The one converter core: enumerate sources -> decode -> masks to boxes -> group-aware split -> write.

A dataset module (``busi``, ``breast``, ``busbra``, ``mask_folders``) only describes its layout:
it lists :class:`SourceImage` records (image, masks and their roles, label, patient, attributes)
and what it could not use. Everything else is done here, once, for every source: decoding and
its checks, cropping and resizing, one COCO annotation per mask (``iscrowd: 1`` for ignore
regions), exact and near-duplicate grouping from the pixels, the split (fractions, k folds or a
published partition) in which no group (patient, near-duplicates) straddles, and the atomic,
deterministic output with ``report.json`` naming every skipped file and its reason.
"""
from __future__ import annotations

import os
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from usdet.data.coco import (PixelStats, categories_for, image_moments, invalidate_previous_output,
                             mask_to_annotation, remove_stale_images, write_coco_dataset)
from usdet.data.crop import find_image_region
from usdet.data.decode import SkipFile, decode_file, is_binary_mask, mask_bool
from usdet.data.duplicates import (NEAR_DUP_CORR, NEAR_DUP_HAMMING, fingerprint, near_duplicate_components,
                                   pixel_sha)
from usdet.data.split import assign_groups, split_by_group

CLASS_CHOICES = {"lesion": ["lesion"], "benign,malignant": ["benign", "malignant"]}
NORMAL = "normal"


class OutputWriteError(Exception):
    """An output file could not be written (disk full, quota, read-only): the run stops.

    Not a per-image problem: skipping the image and going on would leave a dataset that silently
    lacks it. (A plain Exception with (path, reason) args, so it crosses worker processes.)
    """

    def __init__(self, path: str, reason: str):
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot write {self.path}: {self.reason}"


@dataclass
class MaskFile:
    """One mask file of an image. ``role`` "lesion" gives boxes, "ignore" gives COCO ignore regions.

    ``category`` None means the image's label. ``colors`` ({(r, g, b): category}) marks a
    colour-coded class mask: each connected region of each listed colour is one annotation.
    """

    file: str  # as named in report.json (relative to the source root)
    path: str  # where to read it
    role: str = "lesion"
    category: Optional[str] = None
    colors: Optional[Dict[Tuple[int, int, int], str]] = None


@dataclass
class SourceImage:
    """One image of a source layout, as its dataset module describes it (nothing decoded yet)."""

    file: str  # relative name, written as ``source_file``
    path: str  # where to read it
    name: str  # short name: output file stem and default group name
    folder: str  # output sub-folder: images/<folder>/<name>.png
    label: Optional[str]  # benign | malignant | normal | ... ; None: from the masks (lesion if any, else normal)
    masks: List[MaskFile] = field(default_factory=list)
    group: Optional[str] = None  # patient / case: images of one group never straddle splits
    attrs: Dict[str, Any] = field(default_factory=dict)  # extra per-image keys (patient, birads, device, ...)
    mask_hint: str = ""  # expected mask name, for the "mask missing" reason
    strict_masks: bool = False  # a mask with more than two grey values is refused (else thresholded)
    expected_size: Optional[Tuple[int, int]] = None  # (w, h) a table claims: a disagreement is a note
    size_source: str = ""  # which table claims it
    fold: Optional[int] = None  # published cross-validation fold


@dataclass
class SourceScan:
    """What a dataset module found: the images to convert, what it could not use, and report extras."""

    dataset: str
    roots: List[str]  # folders never written to
    images: List[SourceImage]
    skipped: List[Dict[str, str]] = field(default_factory=list)
    notes: List[Dict[str, str]] = field(default_factory=list)
    report: Dict[str, Any] = field(default_factory=dict)
    description: str = ""


@dataclass
class ConvertOptions:
    classes: List[str] = field(default_factory=lambda: ["lesion"])
    fractions: Sequence[float] = (0.7, 0.15, 0.15)
    seed: int = 0
    crop: str = "none"
    workers: int = 1
    image_format: str = "png"
    jpeg_quality: int = 95
    max_size: int = 0
    near_dup_corr: float = NEAR_DUP_CORR
    near_dup_hamming: int = NEAR_DUP_HAMMING
    progress: bool = True
    folds: int = 0  # k-fold cross-validation: 0 = off
    fold: int = 0  # which fold is test (0-based)
    val_fraction: float = 0.15  # of the non-test images, with --folds or a published test fold
    test_fold: Optional[int] = None  # a published partition: images whose fold == test_fold are test
    options_extra: Dict[str, Any] = field(default_factory=dict)  # source options, echoed in report.json


def natural_key(text: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def safe_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "image"


# ----------------------------------------------------------------------------------------------
# Per-image work (runs in worker processes)
# ----------------------------------------------------------------------------------------------
def crop_box_for(bgr: np.ndarray, crop: str) -> Tuple[List[int], Optional[str]]:
    """The kept region ``[x0, y0, x1, y1]`` and, when the cropper refused, why (the whole image is kept)."""
    h, w = bgr.shape[:2]
    whole = [0, 0, w, h]
    if crop != "auto":
        return whole, None
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB) if bgr.ndim == 3 else np.repeat(bgr[..., None], 3, axis=2)
    result = find_image_region(rgb)
    box = getattr(result, "box", None)
    if box is None:
        return whole, f"no image region found ({getattr(result, 'reason', 'no reason given')})"
    x0, y0, x1, y1 = (int(v) for v in box)
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return whole, f"cropper returned an empty region {list(box)}"
    return [x0, y0, x1, y1], None


def write_output_image(path: str, data: bytes) -> None:
    """Write an encoded image via a temp file + rename (a killed run never leaves a partial file).

    Unlike usdet.utils.io.atomic_write there is no fsync per image (it doubled the run time);
    the conversion syncs once before writing the JSONs, so JSONs never point at unflushed images.
    An identical existing file is left alone, which keeps re-runs fast and byte-identical.
    """
    try:
        if os.path.getsize(path) == len(data):
            with open(path, "rb") as fh:
                if fh.read() == data:
                    return
    except OSError:
        pass
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise OutputWriteError(path, e.strerror or str(e)) from None
        raise


_WORKER: Dict[str, Any] = {}


def _init_worker(out_dir: str, options: ConvertOptions) -> None:
    cv2.setNumThreads(1)
    try:  # OpenCV's own warnings (e.g. "PNG input buffer is incomplete") would only repeat the report
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    except AttributeError:
        pass
    _WORKER.update(out_dir=out_dir, options=options)


def _color_regions(mf: MaskFile, bgr: np.ndarray, notes: List[Tuple[str, str]]) -> List[Tuple[str, np.ndarray]]:
    """(category, region) for every connected region of every listed colour of a colour-coded mask."""
    rgb = bgr[..., ::-1]
    known = np.zeros(rgb.shape[:2], bool)
    out = []
    for color, category in sorted(mf.colors.items()):
        hit = np.all(rgb == np.array(color, np.uint8), axis=2)
        known |= hit
        n, labels = cv2.connectedComponents(hit.view(np.uint8), connectivity=8)
        out += [(category, labels == k) for k in range(1, n)]
    stray = int(np.count_nonzero(~known & rgb.any(axis=2)))
    if stray:
        notes.append((mf.file, f"{stray} pixels of a colour not in --mask-colors ignored"))
    return out


def _category_id(category: str, classes: List[str], where: str) -> int:
    if classes == ["lesion"]:
        return 1
    if category not in classes:
        raise SkipFile(where, f"label {category!r} is not one of --classes {','.join(classes)}")
    return classes.index(category) + 1


def _read_masks(src: SourceImage, w: int, h: int, notes: List[Tuple[str, str]]):
    """Decode and check every mask; returns [(file, role, category or None, bool mask)]."""
    regions = []
    for mf in src.masks:
        arr, mnotes = decode_file(mf.path, mf.file, is_mask=True, color_mask=mf.colors is not None)
        notes += [(mf.file, n) for n in mnotes if "Pillow" in n]
        if arr.shape[:2] != (h, w):
            raise SkipFile(mf.file, f"mask is {arr.shape[1]}x{arr.shape[0]} but its image {src.file} is {w}x{h}")
        if mf.colors is not None:
            found = _color_regions(mf, arr, notes)
            if not found:
                notes.append((mf.file, "empty mask (no pixel of a listed colour): no annotation"))
            regions += [(mf.file, mf.role, cat, m) for cat, m in found]
            continue
        if src.strict_masks and not is_binary_mask(arr):
            raise SkipFile(mf.file, "mask is not binary (more than two grey values)")
        m = mask_bool(arr)
        if not m.any():
            if mf.role == "lesion" and src.label != NORMAL:
                notes.append((mf.file, "empty mask: no annotation"))
            elif mf.role == "ignore":
                notes.append((mf.file, "empty ignore mask: no ignore region"))
            continue
        regions.append((mf.file, mf.role, mf.category, m))
    return regions


def _resize(out: np.ndarray, regions: list, max_size: int):
    scale = 1.0
    if max_size and max(out.shape[:2]) > max_size:
        ch, cw = out.shape[:2]
        scale = max_size / max(ch, cw)
        size = (max(1, round(cw * scale)), max(1, round(ch * scale)))
        out = cv2.resize(out, size, interpolation=cv2.INTER_AREA)
        resized = []
        for file, role, cat, m in regions:
            soft = cv2.resize(m.astype(np.uint8) * 255, size, interpolation=cv2.INTER_AREA)
            small = soft >= 128
            resized.append((file, role, cat, small if small.any() else soft > 0))  # keep tiny lesions
        regions = resized
    return out, regions, scale


def _process(job: Tuple[int, SourceImage, str]) -> Dict[str, Any]:
    """Decode, check, crop, resize, write one image; return its entry, annotations and fingerprints."""
    index, src, file_name = job
    out_dir, opt = _WORKER["out_dir"], _WORKER["options"]
    notes: List[Tuple[str, str]] = []
    result: Dict[str, Any] = {"index": index, "notes": notes}
    try:
        img, inotes = decode_file(src.path, src.file, is_mask=False)
        notes += [(src.file, n) for n in inotes]
        h, w = img.shape[:2]
        if src.expected_size and tuple(src.expected_size) != (w, h):
            notes.append((src.file, f"{src.size_source} says {src.expected_size[0]}x{src.expected_size[1]}, "
                                    f"the image is {w}x{h} (the image is used)"))
        if img.ndim == 3:
            b, g, r = cv2.split(img)
            if not cv2.countNonZero(cv2.absdiff(b, g)) and not cv2.countNonZero(cv2.absdiff(b, r)):
                img = b  # R=G=B: one channel is the whole image (smaller, faster file)
        lesion_expected = src.label is not None and src.label != NORMAL
        if lesion_expected and not any(m.role == "lesion" for m in src.masks):
            raise SkipFile(src.file, f"mask missing (expected {src.mask_hint or 'a lesion mask'})")
        if not src.masks:
            notes.append((src.file, "normal image without a mask file: kept as a negative"))
        regions = _read_masks(src, w, h, notes)
        lesions = [r for r in regions if r[1] == "lesion"]
        if src.label == NORMAL and lesions:
            raise SkipFile(src.file, f"normal image with a non-empty mask ({lesions[0][0]}): label conflict")
        if lesion_expected and not lesions:
            raise SkipFile(src.file, f"{src.label} image whose masks are all empty (no lesion to box)")
        label = src.label
        if label is None:  # from the masks
            cats = {r[2] or "lesion" for r in lesions}
            label = NORMAL if not cats else ("malignant" if "malignant" in cats else sorted(cats)[0])

        # duplicate fingerprints from the source pixels, so groups and splits do not depend on
        # --crop, --max-size or --image-format (a compact copy keeps the full copy's splits)
        result["pixel_sha"] = pixel_sha(img)
        result["vec"], result["dhash"] = fingerprint(img)

        crop_box, refusal = crop_box_for(img, opt.crop)
        result["crop"] = ("refused: " + refusal) if refusal else (
            "cropped" if crop_box != [0, 0, w, h] else "whole image")
        x0, y0, x1, y1 = crop_box
        regions = [(f, role, cat, m[y0:y1, x0:x1]) for f, role, cat, m in regions]
        out, regions, scale = _resize(img[y0:y1, x0:x1], regions, opt.max_size)
        oh, ow = out.shape[:2]

        ext = ".jpg" if opt.image_format == "jpg" else ".png"
        params = [cv2.IMWRITE_JPEG_QUALITY, int(opt.jpeg_quality)] if ext == ".jpg" else []
        anns = []
        for file, role, cat, m in regions:
            cat_id = _category_id(cat or label, opt.classes, file if cat else src.file)
            ann = mask_to_annotation(m, category_id=cat_id)
            if ann is None:
                what = "lesion" if role == "lesion" else "ignore region"
                notes.append((file, f"{what} lies outside the kept region: no annotation"))
                continue
            if role == "ignore":
                ann["iscrowd"] = 1
            ann["source_mask"] = file
            anns.append(ann)
        if lesion_expected and not any(a["iscrowd"] == 0 for a in anns):
            raise SkipFile(src.file, "every lesion lies outside the kept (cropped) region")
        ok, buf = cv2.imencode(ext, np.ascontiguousarray(out), params)
        if not ok:
            raise SkipFile(src.file, f"could not encode the output image as {ext}")
        write_output_image(os.path.join(out_dir, file_name), buf.tobytes())

        entry = {"file_name": file_name, "width": ow, "height": oh, "source_file": src.file,
                 "crop_box": crop_box, "label": label}
        if scale != 1.0:
            entry["scale"] = round(scale, 6)  # written pixels per source pixel
        entry.update(src.attrs)
        written = out
        if ext == ".jpg":  # statistics describe the image as written, JPEG loss included
            written = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        n, s, ss = image_moments(written)
        if written.ndim == 3:  # BGR -> RGB order
            s, ss = s[::-1], ss[::-1]
        result.update(ok=True, image=entry, anns=anns, moments=(n, s, ss), label=label)
    except SkipFile as e:
        result.update(ok=False, skip={"file": e.file, "reason": e.reason})
    except OutputWriteError:
        raise
    except Exception as e:  # one bad file must not lose the rest; report it with its reason
        result.update(ok=False, skip={"file": src.file, "reason": f"unexpected error: {type(e).__name__}: {e}"})
    return result


# ----------------------------------------------------------------------------------------------
# The conversion
# ----------------------------------------------------------------------------------------------
def check_paths(roots: Sequence[str], out_dir: str) -> None:
    """Refuse an output inside a source folder (ROOT is never written to) or a source inside the output."""
    o = os.path.realpath(out_dir)
    for root in roots:
        r = os.path.realpath(root)
        if o == r or o.startswith(r + os.sep):
            raise ValueError(f"--output {out_dir!r} is inside the source folder {root!r}; sources are never "
                             "written to")
        for sub in ("images", "annotations"):
            if r == os.path.join(o, sub) or r.startswith(os.path.join(o, sub) + os.sep):
                raise ValueError(f"source folder {root!r} lies inside the output's {sub}/ folder; choose "
                                 "another --output")


def _iter_results(jobs, out_dir, options):
    if options.workers <= 1:
        _init_worker(out_dir, options)
        for job in jobs:
            yield _process(job)
        return
    import multiprocessing as mp

    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    with ctx.Pool(options.workers, initializer=_init_worker, initargs=(out_dir, options)) as pool:
        yield from pool.imap(_process, jobs, chunksize=4)


def _output_names(images: List[SourceImage], ext: str) -> List[str]:
    used: set = set()
    names = []
    for src in images:
        base = f"images/{src.folder}/{safe_stem(src.name)}"
        name, k = base + ext, 2
        while name in used:  # two sources that sanitise alike keep distinct outputs
            name, k = f"{base}_{k}{ext}", k + 1
        used.add(name)
        names.append(name)
    return names


def _groups(scan: SourceScan, kept: List[int], results, opt: ConvertOptions):
    """Group of every kept image: declared groups (patients) joined with near-duplicate components."""
    vecs = np.zeros((len(kept), 4096), np.float16)
    hashes = np.zeros((len(kept), 32), np.uint8)
    for row, i in enumerate(kept):  # fingerprints move out of the per-image results: one copy is held
        vecs[row] = results[i].pop("vec")
        hashes[row] = np.frombuffer(results[i].pop("dhash"), np.uint8)
    comp = near_duplicate_components(vecs, hashes, opt.near_dup_corr, opt.near_dup_hamming)
    near: Dict[int, List[int]] = defaultdict(list)
    for pos, c in enumerate(comp):
        near[int(c)].append(kept[pos])
    # union-find over images: one near-duplicate component, or one declared group, is one set
    parent = {i: i for i in kept}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    first_of_group: Dict[str, int] = {}
    for i in kept:
        g = scan.images[i].group
        if g is not None:
            union(first_of_group.setdefault(g, i), i)
    for members in near.values():
        for i in members[1:]:
            union(members[0], i)
    sets: Dict[int, List[int]] = defaultdict(list)
    for i in kept:
        sets[find(i)].append(i)
    group_of: Dict[int, str] = {}
    for members in sets.values():
        declared = [scan.images[i].group for i in sorted(members) if scan.images[i].group is not None]
        gname = declared[0] if declared else safe_stem(scan.images[min(members)].name)
        for i in members:
            group_of[i] = gname
    return group_of, [sorted(m) for m in near.values() if len(m) > 1]


def _assign_splits(scan: SourceScan, kept: List[int], labels: Dict[int, str], group_of: Dict[int, str],
                   opt: ConvertOptions) -> Tuple[Dict[int, str], List[str], Dict[str, Any]]:
    """Split of every kept image, the splits to write, and what report.json says about the split."""
    keys = [scan.images[i].file for i in kept]
    groups = [group_of[i] for i in kept]
    labs = [labels[i] for i in kept]
    if opt.test_fold is not None:
        test = [i for i in kept if scan.images[i].fold == opt.test_fold]
        rest = [i for i in kept if scan.images[i].fold != opt.test_fold]
        inner = assign_groups([scan.images[i].file for i in rest], [group_of[i] for i in rest],
                              [labels[i] for i in rest], [1.0 - opt.val_fraction, opt.val_fraction],
                              opt.seed) if rest else {}
        split_of = {i: "test" for i in test}
        split_of.update({i: ("train", "val")[inner[scan.images[i].file]] for i in rest})
        test_groups = {group_of[i] for i in test}
        straddle = sorted({group_of[i] for i in rest if group_of[i] in test_groups})
        info = {"method": "published folds", "test_fold": opt.test_fold, "val_fraction": opt.val_fraction,
                "seed": opt.seed, "folds_present": sorted({scan.images[i].fold for i in kept}),
                "groups_straddling_the_published_partition": straddle}
        written = ["train", "val", "test"] if opt.val_fraction > 0 else ["train", "test"]
    else:
        by_key, written, info = split_by_group(keys, groups, labs, opt.fractions, opt.seed, opt.folds, opt.fold,
                                               opt.val_fraction)
        split_of = {i: by_key[scan.images[i].file] for i in kept}
    return split_of, written, info


def convert(scan: SourceScan, out_dir: str, options: Optional[ConvertOptions] = None) -> Dict[str, Any]:
    """Convert the images a dataset module found into ``out_dir``; returns the report dict."""
    from tqdm import tqdm

    opt = options or ConvertOptions()
    if list(opt.classes) not in CLASS_CHOICES.values():
        raise ValueError(f"classes must be 'lesion' or 'benign,malignant', got {opt.classes}")
    check_paths(scan.roots, out_dir)
    invalidate_previous_output(out_dir)
    categories = categories_for(opt.classes)
    sources = scan.images
    skipped = list(scan.skipped)
    notes = list(scan.notes)
    if opt.test_fold is not None:
        outside = [i for i, s in enumerate(sources) if s.fold is None]
        skipped += [{"file": sources[i].file, "reason": "not in the folds file (no published fold)"} for i in outside]
        sources = [s for s in sources if s.fold is not None]
        scan = SourceScan(**{**scan.__dict__, "images": sources})

    ext = ".jpg" if opt.image_format == "jpg" else ".png"
    names = _output_names(sources, ext)
    jobs = [(i, src, names[i]) for i, src in enumerate(sources)]
    results: List[Optional[Dict[str, Any]]] = [None] * len(sources)
    with tqdm(total=len(jobs), desc=scan.dataset, unit="img", disable=not opt.progress, file=sys.stderr) as bar:
        for res in _iter_results(jobs, out_dir, opt):
            notes += [{"file": f, "note": n} for f, n in res.pop("notes")]
            if res.get("ok"):
                results[res["index"]] = res
            else:
                skipped.append(res["skip"])
            bar.update(1)
    kept = [i for i in range(len(sources)) if results[i] is not None]
    labels = {i: results[i]["label"] for i in kept}

    # exact duplicates (pixel-identical): conflicting labels -> drop all copies; same label -> one group
    by_sha: Dict[str, List[int]] = defaultdict(list)
    for i in kept:
        by_sha[results[i]["pixel_sha"]].append(i)
    exact_dups = []
    excluded: set = set()
    for members in sorted(by_sha.values(), key=lambda m: m[0]):
        if len(members) < 2:
            continue
        dup_labels = sorted({labels[i] for i in members})
        conflict = len(dup_labels) > 1
        exact_dups.append({"files": [sources[i].file for i in members], "labels": dup_labels,
                           "action": "excluded (conflicting labels)" if conflict else "kept in one group"})
        if conflict:
            for i in members:
                excluded.add(i)
                skipped.append({"file": sources[i].file, "reason": "exact duplicate with a conflicting label: "
                                + " = ".join(sources[j].file for j in members)})
                try:  # its image was written before the duplicate was known
                    os.remove(os.path.join(out_dir, names[i]))
                except FileNotFoundError:
                    pass
    kept = [i for i in kept if i not in excluded]
    group_of, near_sets = _groups(scan, kept, results, opt)
    split_of, written_splits, split_info = _assign_splits(scan, kept, labels, group_of, opt)

    images_by_split: Dict[str, list] = {s: [] for s in written_splits}
    anns_by_split: Dict[str, list] = {s: [] for s in written_splits}
    stats = PixelStats()
    cat_name = {c["id"]: c["name"] for c in categories}
    counts = {s: {"images": 0, "annotations": 0, "ignore_regions": 0, "images_by_label": Counter(),
                  "annotations_by_category": Counter()} for s in written_splits + ["total"]}
    next_ann = 1
    for image_id, i in enumerate(kept, start=1):  # kept is in scan order
        res, split = results[i], split_of[i]
        entry = {"id": image_id, **res["image"], "group": group_of[i]}
        images_by_split[split].append(entry)
        for ann in res["anns"]:
            anns_by_split[split].append({"id": next_ann, "image_id": image_id, **ann})
            next_ann += 1
        if split == "train":
            stats.add_moments(*res["moments"])
        lesions = [a for a in res["anns"] if not a["iscrowd"]]
        for s in (split, "total"):
            c = counts[s]
            c["images"] += 1
            c["annotations"] += len(lesions)
            c["ignore_regions"] += len(res["anns"]) - len(lesions)
            c["images_by_label"][entry["label"]] += 1
            c["annotations_by_category"].update(cat_name[a["category_id"]] for a in lesions)
    for c in counts.values():
        c["images_by_label"] = dict(sorted(c["images_by_label"].items()))
        c["annotations_by_category"] = dict(sorted(c["annotations_by_category"].items()))
        c["images_with_ignore_regions"] = 0
    for split, ims in images_by_split.items():
        with_ignore = {a["image_id"] for a in anns_by_split[split] if a["iscrowd"]}
        counts[split]["images_with_ignore_regions"] = len(with_ignore)
        counts["total"]["images_with_ignore_regions"] += len(with_ignore)

    near_groups = []
    for members in sorted(near_sets, key=min):
        members = [i for i in members if i in group_of]
        if len(members) < 2:
            continue
        mlabels = sorted({labels[i] for i in members})
        near_groups.append({"group": group_of[members[0]], "split": split_of[members[0]],
                            "files": [sources[i].file for i in members], "labels": mlabels,
                            "label_conflict": len(mlabels) > 1})
    report: Dict[str, Any] = {
        "dataset": scan.dataset,
        "options": {"classes": list(opt.classes), "split": [round(f, 6) for f in opt.fractions], "seed": opt.seed,
                    "crop": opt.crop, "image_format": opt.image_format, "max_size": opt.max_size,
                    "near_dup_corr": opt.near_dup_corr, "near_dup_hamming": opt.near_dup_hamming,
                    **opt.options_extra},
        **scan.report,
        "split": split_info,
        "counts": counts,
        "exact_duplicates": exact_dups,
        "near_duplicate_groups": near_groups,
        "skipped": sorted(skipped, key=lambda s: (natural_key(s["file"]), s["reason"])),
        "notes": sorted(notes, key=lambda s: (natural_key(s["file"]), s["note"])),
    }
    crop_outcomes = Counter(results[i]["crop"] for i in kept)
    report["crop"] = {"requested": opt.crop, "used": opt.crop, "outcomes": dict(sorted(crop_outcomes.items()))}
    remove_stale_images(out_dir, sorted({s.folder for s in sources}), {names[i] for i in kept})
    if hasattr(os, "sync"):
        os.sync()  # every image is on disk before any JSON refers to it
    write_coco_dataset(out_dir, images_by_split, anns_by_split, categories, report=report,
                       pixel_stats=stats.result("train"),
                       info={"description": scan.description or f"{scan.dataset}, converted by usdet"})
    return report
