"""The one converter core: enumerate sources -> decode -> masks to boxes -> group-aware split -> write.

A dataset module (``busi``, ``breast``, ``busbra``, ``mask_folders``) only describes its layout:
it lists :class:`SourceImage` records (image, masks and their roles, label, patient, attributes)
and what it could not use. Everything else is done once, for every source: per image, in worker
processes (:mod:`usdet.data.convert_image`), decoding and its checks, cropping and resizing, one
COCO annotation per mask (``iscrowd: 1`` for ignore regions); here, exact and near-duplicate
grouping from the pixels, the split (fractions, k folds or a
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

import numpy as np

from usdet.data import convert_image
from usdet.data.coco import (PixelStats, categories_for, invalidate_previous_output, remove_stale_images,
                             write_coco_dataset)
from usdet.data.convert_image import (ConversionBugError, MaskFile, OutputWriteError,  # noqa: F401  (the core's API)
                                      SourceImage)
from usdet.data.defaults import CLASS_CHOICES, NEAR_DUP_CORR, NEAR_DUP_HAMMING
from usdet.data.duplicates import components, near_duplicate_components
from usdet.data.split import split_by_group, train_val_split


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
        convert_image.init_worker(out_dir, options)
        for job in jobs:
            yield convert_image.process_image(job)
        return
    import multiprocessing as mp

    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    with ctx.Pool(options.workers, initializer=convert_image.init_worker, initargs=(out_dir, options)) as pool:
        yield from pool.imap(convert_image.process_image, jobs, chunksize=4)


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


def _pixel_identical(sources: List[SourceImage], kept: List[int], results) -> Dict[str, List[int]]:
    """Kept images by the hash of their decoded pixels, hashed only where it can matter.

    Pixel-identical images have identical sizes and fingerprints (both are functions of the
    pixels), so only images whose size and fingerprint tie with another's are decoded again and
    hashed here: almost none, instead of hashing every image in the workers (a tenth of the
    converter's work beyond decode + write, benchmarks/bench_convert.py).
    """
    ties: Dict[Any, List[int]] = defaultdict(list)
    for i in kept:
        r = results[i]
        ties[(r["source_size"], r["vec"].tobytes(), r["dhash"])].append(i)
    by_sha: Dict[str, List[int]] = defaultdict(list)
    for members in ties.values():
        if len(members) > 1:
            for i in members:
                by_sha[convert_image.pixel_identity(sources[i])].append(i)
    return by_sha


def _groups(scan: SourceScan, kept: List[int], results, opt: ConvertOptions):
    """Group of every kept image: declared groups (patients) joined with near-duplicate components."""
    # float32 holding the workers' float16 values exactly: the same graph, without converting every
    # tile again for each tile it is compared with (8 KiB more per image than float16)
    vecs = np.zeros((len(kept), 4096), np.float32)
    hashes = np.zeros((len(kept), 32), np.uint8)
    for row, i in enumerate(kept):  # fingerprints move out of the per-image results: one copy is held
        vecs[row] = results[i].pop("vec")
        hashes[row] = np.frombuffer(results[i].pop("dhash"), np.uint8)
    comp = near_duplicate_components(vecs, hashes, opt.near_dup_corr, opt.near_dup_hamming)
    near: Dict[int, List[int]] = defaultdict(list)
    for pos, c in enumerate(comp):
        near[int(c)].append(kept[pos])
    # one near-duplicate component, or one declared group (patient), is one set
    pos_of = {i: p for p, i in enumerate(kept)}
    pairs = []
    first_of_group: Dict[str, int] = {}
    for i in kept:
        g = scan.images[i].group
        if g is not None:
            pairs.append((pos_of[first_of_group.setdefault(g, i)], pos_of[i]))
    for members in near.values():
        pairs += [(pos_of[members[0]], pos_of[i]) for i in members[1:]]
    sets: Dict[int, List[int]] = defaultdict(list)
    for pos, root in enumerate(components(len(kept), pairs)):
        sets[int(root)].append(kept[pos])
    group_of: Dict[int, str] = {}
    for members in sets.values():
        declared = [scan.images[i].group for i in sorted(members) if scan.images[i].group is not None]
        gname = declared[0] if declared else safe_stem(scan.images[min(members)].name)
        for i in members:
            group_of[i] = gname
    return group_of, [sorted(m) for m in near.values() if len(m) > 1]


def _folds_file(opt: ConvertOptions) -> str:
    return str(opt.options_extra.get("folds_file") or "the folds file")


def check_test_fold(scan: SourceScan, opt: ConvertOptions) -> None:
    """Refuse a published test fold that no listed image has (a typo, or counting from 0): it would
    write an empty test split. Checked before anything is decoded or written."""
    if opt.test_fold is None:
        return
    present = sorted({s.fold for s in scan.images if s.fold is not None})
    if opt.test_fold not in present:
        raise ValueError(
            f"--test-fold {opt.test_fold}: no image of {_folds_file(opt)} is in fold {opt.test_fold}; its folds are "
            f"{present} (the kFold values as written: BUS-BRA's published folds count from 1, unlike --fold, "
            f"which counts from 0)")


def _refuse_empty_test(scan: SourceScan, kept: List[int], split_of: Dict[int, str], skipped: List[Dict[str, str]],
                       opt: ConvertOptions) -> None:
    """A fold that selects no converted image would write an empty test split and exit 0: refuse it."""
    if not kept or any(s == "test" for s in split_of.values()):
        return  # nothing converted at all is reported as such (exit 1)
    if opt.test_fold is not None:
        files = {s.file for s in scan.images if s.fold == opt.test_fold}
        why = [f"{s['file']}: {s['reason']}" for s in skipped if s["file"] in files][:3]
        raise ValueError(f"--test-fold {opt.test_fold}: every image of fold {opt.test_fold} of {_folds_file(opt)} was "
                         f"skipped, so the test split would be empty (e.g. {'; '.join(why) or 'no reason recorded'})")
    if opt.folds:
        raise ValueError(f"--folds {opt.folds} --fold {opt.fold}: fold {opt.fold} (folds count from 0) holds no image: "
                         f"the {len(kept)} converted images form fewer groups (patients, near-duplicate sets) than "
                         f"--folds; use fewer folds")


def _assign_splits(scan: SourceScan, kept: List[int], labels: Dict[int, str], group_of: Dict[int, str],
                   opt: ConvertOptions) -> Tuple[Dict[int, str], List[str], Dict[str, Any]]:
    """Split of every kept image, the splits to write, and what report.json says about the split."""
    keys = [scan.images[i].file for i in kept]
    groups = [group_of[i] for i in kept]
    labs = [labels[i] for i in kept]
    if opt.test_fold is not None:
        test = [i for i in kept if scan.images[i].fold == opt.test_fold]
        rest = [i for i in kept if scan.images[i].fold != opt.test_fold]
        inner = train_val_split([scan.images[i].file for i in rest], [group_of[i] for i in rest],
                                [labels[i] for i in rest], opt.val_fraction, opt.seed)
        split_of = {i: "test" for i in test}
        split_of.update({i: inner[scan.images[i].file] for i in rest})
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
    check_test_fold(scan, opt)
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
    errors: List[Dict[str, str]] = []
    with tqdm(total=len(jobs), desc=scan.dataset, unit="img", disable=not opt.progress, file=sys.stderr) as bar:
        for res in _iter_results(jobs, out_dir, opt):
            notes += [{"file": f, "note": n} for f, n in res.pop("notes")]
            if res.get("ok"):
                results[res["index"]] = res
            elif "error" in res:
                errors.append(res["error"])
            else:
                skipped.append(res["skip"])
            bar.update(1)
    if errors:  # before any JSON: the output stays marked incomplete
        raise ConversionBugError(errors)
    kept = [i for i in range(len(sources)) if results[i] is not None]
    labels = {i: results[i]["label"] for i in kept}

    # exact duplicates (pixel-identical): conflicting labels -> drop all copies; same label -> one group
    by_sha = _pixel_identical(sources, kept, results)
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
    _refuse_empty_test(scan, kept, split_of, skipped, opt)

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
