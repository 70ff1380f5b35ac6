#!/usr/bin/env python
"""Convert a dataset to usdet's COCO layout (OUT/annotations/{train,val,test}.json + images).

  python tools/convert_to_coco.py busi   --root ROOT --output OUT [options]
  python tools/convert_to_coco.py breast --root ../shared/data/breast --output OUT [--other-masks ignore]
  python tools/convert_to_coco.py busbra --root ROOT --output OUT [--folds-file 5-fold-cv.csv --test-fold K]
  python tools/convert_to_coco.py masks  --images DIR --masks DIR [--table CSV] --output OUT [options]
  python tools/convert_to_coco.py frames --images DIR --annotations FILE --output OUT --key-file KEY [options]

busi, breast, busbra and masks share one converter core (usdet.data.convert): the same options,
the same checks, `--folds K --fold k` for cross-validation, and a report.json naming every skipped
file. ``--help`` after a subcommand lists its options. This script parses arguments only; the
work is done in usdet.data (imported when a subcommand runs, so --help stays fast).
"""
import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from usdet.utils.known_warnings import silence_known_warnings  # noqa: E402

silence_known_warnings()  # before any third-party deprecation is printed

# light modules (no numpy or OpenCV): --help stays fast
from usdet.data.defaults import CLASS_CHOICES, NEAR_DUP_CORR, NEAR_DUP_HAMMING  # noqa: E402
from usdet.data.split import SPLITS, parse_fractions  # noqa: E402


# ----------------------------------------------------------------------------------------------
# options shared by the sources of the converter core
# ----------------------------------------------------------------------------------------------
def add_core_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, help="output folder (e.g. datasets/<name>)")
    p.add_argument("--classes", default="lesion", choices=CLASS_CHOICES,
                   help="one 'lesion' class (as in the original study) or 'benign,malignant'")
    p.add_argument("--split", default="0.7,0.15,0.15",
                   help="train,val,test fractions (default 0.7,0.15,0.15); a zero fraction (e.g. 0,0,1 for an "
                        "external test set) writes no file for that split")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--folds", type=int, default=0,
                   help="K-fold cross-validation: K folds by group (patients, near-duplicates); --fold is test, "
                        "the rest train/val (replaces --split)")
    p.add_argument("--fold", type=int, default=0,
                   help="the test fold with --folds, counted from 0: 0..K-1 (default 0); not BUS-BRA's published "
                        "fold numbers, which count from 1 (those are --folds-file/--test-fold)")
    p.add_argument("--val-fraction", type=float, default=0.15,
                   help="share of the non-test images that goes to val with --folds or --test-fold (default 0.15)")
    p.add_argument("--crop", default="none", choices=("auto", "none"),
                   help="'auto': crop to the scanner's image region (usdet.data.crop); 'none': unchanged")
    p.add_argument("--workers", type=int, default=1, help="parallel decode/encode processes (default 1)")
    p.add_argument("--image-format", default="png", choices=("png", "jpg"),
                   help="written image format (png is lossless; default png)")
    p.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality for --image-format jpg")
    p.add_argument("--max-size", type=int, default=0,
                   help="downscale so the longer side is at most N pixels (0: keep size); "
                        "masks are resized with the image and boxes recomputed on them")
    p.add_argument("--near-dup-corr", type=float, default=NEAR_DUP_CORR,
                   help=f"64x64 grayscale correlation that makes two frames near-duplicates (default {NEAR_DUP_CORR})")
    p.add_argument("--near-dup-hamming", type=int, default=NEAR_DUP_HAMMING,
                   help=f"256-bit dHash Hamming distance that makes two frames near-duplicates "
                        f"(default {NEAR_DUP_HAMMING})")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def check_folds(args: argparse.Namespace) -> None:
    """Raise ValueError for --folds/--fold/--val-fraction values that cannot work."""
    if args.folds == 1 or args.folds < 0:
        raise ValueError(f"--folds must be at least 2 (or 0: off), got {args.folds}")
    if args.folds and not 0 <= args.fold < args.folds:
        raise ValueError(f"--fold must be in 0..{args.folds - 1}, got {args.fold}")
    if not 0 <= args.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")


def core_options(args: argparse.Namespace, **extra):
    from usdet.data.convert import ConvertOptions

    check_folds(args)
    test_fold = extra.pop("test_fold", None)
    return ConvertOptions(
        classes=CLASS_CHOICES[args.classes], fractions=parse_fractions(args.split), seed=args.seed, crop=args.crop,
        workers=max(1, args.workers), image_format=args.image_format, jpeg_quality=args.jpeg_quality,
        max_size=max(0, args.max_size), near_dup_corr=args.near_dup_corr, near_dup_hamming=args.near_dup_hamming,
        progress=not args.no_progress, folds=args.folds, fold=args.fold, val_fraction=args.val_fraction,
        test_fold=test_fold, options_extra=extra)


def run_core(name: str, args: argparse.Namespace, scan_fn, **extra) -> int:
    """Scan with ``scan_fn()``, convert, print one summary line; exit code 0 ok, 1 nothing converted, the
    output could not be written or an image failed with an unexpected error (a bug), 2 bad arguments or layout."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from usdet.data.convert import ConversionBugError, OutputWriteError, convert

    try:
        options = core_options(args, **extra)
        t0 = time.time()
        report = convert(scan_fn(), args.output, options)
    except ValueError as e:  # bad arguments, a layout or table that cannot be used at all
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    except ConversionBugError as e:  # a bug, not bad input: never a quiet exit 0
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    except (OutputWriteError, OSError) as e:
        where = getattr(e, "filename", None) or getattr(e, "path", None) or args.output
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e)
        print(f"{name}: error: cannot write {where}: {reason}. The conversion stopped; {args.output} holds no "
              f"report.json, so it is marked incomplete: free space (or fix permissions) and re-run the same "
              f"command", file=sys.stderr)
        return 1
    counts = report["counts"]
    total = counts["total"]
    print(f"{name}: wrote {total['images']} images ({total['annotations']} boxes, {total['ignore_regions']} ignore "
          f"regions) to {args.output} in {time.time() - t0:.1f} s; "
          + ", ".join(f"{s} {counts[s]['images']}" for s in SPLITS if s in counts)
          + f"; {len(report['skipped'])} files skipped, {len(report['near_duplicate_groups'])} near-duplicate "
            f"groups; details in {os.path.join(args.output, 'report.json')}")
    return 0 if total["images"] > 0 else 1


# ----------------------------------------------------------------------------------------------
# subcommands
# ----------------------------------------------------------------------------------------------
def add_busi(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default=os.environ.get("USDET_BUSI_ROOT"),
                   help="BUSI folder holding benign/, malignant/, normal/ (default: $USDET_BUSI_ROOT)")
    add_core_arguments(p)


def run_busi(args: argparse.Namespace) -> int:
    if not args.root:
        print("busi: --root is required (or set USDET_BUSI_ROOT)", file=sys.stderr)
        return 2
    from usdet.data.busi import scan_busi

    return run_core("busi", args, lambda: scan_busi(args.root))


def add_breast(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", required=True, help="BrEaST-Lesions-USG folder (the .xlsx and the images folder)")
    p.add_argument("--other-masks", default="ignore", choices=("ignore", "lesion", "skip"),
                   help="the _otherK masks (other suspicious regions, e.g. cysts): 'ignore' = COCO ignore regions "
                        "(iscrowd 1, neither positive nor false positive; default), 'lesion' = boxes like the "
                        "tumour, 'skip' = not used")
    add_core_arguments(p)


def run_breast(args: argparse.Namespace) -> int:
    from usdet.data.breast import scan_breast

    return run_core("breast", args, lambda: scan_breast(args.root, args.other_masks), other_masks=args.other_masks)


def add_busbra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", required=True, help="BUS-BRA folder (Images/, Masks/, bus_data.csv, *-fold-cv.csv)")
    p.add_argument("--folds-file", default=None,
                   help="the published partition, e.g. 5-fold-cv.csv (relative paths are read from --root)")
    p.add_argument("--test-fold", type=int, default=None,
                   help="with --folds-file: the published fold that becomes the test split, as written in its "
                        "kFold column; BUS-BRA's count from 1 (1..5 in 5-fold-cv.csv), unlike --fold, which counts "
                        "from 0. A fold no image is in is refused")
    add_core_arguments(p)


def run_busbra(args: argparse.Namespace) -> int:
    from usdet.data.busbra import scan_busbra

    if (args.folds_file is None) != (args.test_fold is None):
        print("busbra: --folds-file and --test-fold go together", file=sys.stderr)
        return 2
    if args.folds_file and args.folds:
        print("busbra: use either --folds (own folds) or --folds-file (published folds)", file=sys.stderr)
        return 2
    extra = {"folds_file": args.folds_file, "test_fold": args.test_fold} if args.folds_file else {}
    return run_core("busbra", args, lambda: scan_busbra(args.root, args.folds_file), **extra)


def add_masks(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", required=True, help="folder of images (searched recursively)")
    p.add_argument("--masks", required=True, help="folder of mask files")
    p.add_argument("--mask-pattern", default="{stem}_mask*.png",
                   help="mask file names of an image, relative to --masks, with {stem} (image name without "
                        "extension) and {dir} (its sub-folder) and shell wildcards; several matches = several "
                        "masks (default '{stem}_mask*.png')")
    p.add_argument("--mask-colors", default=None,
                   help="colour-coded class masks, e.g. '0,255,0=benign;255,0,0=malignant' (the BUS-UCLM "
                        "convention): each connected region of a listed RGB colour is one box of that class")
    p.add_argument("--table", default=None,
                   help="optional CSV with one row per image: an image column and any of label, patient and "
                        "further attributes (kept as image keys)")
    p.add_argument("--image-column", default="image", help="table column naming the image (default 'image')")
    p.add_argument("--label-column", default="label", help="table column with benign/malignant/normal (default 'label')")
    p.add_argument("--patient-column", default="patient",
                   help="table column with the patient (images of one patient never straddle splits; default 'patient')")
    p.add_argument("--attributes", default="",
                   help="comma-separated table columns written as image keys (e.g. 'device,birads')")
    p.add_argument("--key-file", default=None,
                   help="pseudonym key (default: $USDET_PSEUDONYM_KEY), required when the table has a patient "
                        "column: patients are written only as keyed pseudonyms")
    p.add_argument("--name", default="masks", help="dataset name in report.json (default 'masks')")
    add_core_arguments(p)


def run_masks(args: argparse.Namespace) -> int:
    from usdet.data.mask_folders import parse_mask_colors, scan_mask_folders

    name = args.name

    def scan():
        colors = parse_mask_colors(args.mask_colors) if args.mask_colors else None
        return scan_mask_folders(args.images, args.masks, args.mask_pattern, colors=colors, table=args.table,
                                 image_column=args.image_column, label_column=args.label_column,
                                 patient_column=args.patient_column,
                                 attributes=[a.strip() for a in args.attributes.split(",") if a.strip()],
                                 key_file=args.key_file, dataset=name)

    return run_core(name, args, scan, mask_pattern=args.mask_pattern, mask_colors=args.mask_colors,
                    table=os.path.basename(args.table) if args.table else None)


def add_frames(parser: argparse.ArgumentParser) -> None:
    """Options of ``convert_to_coco.py frames`` (hospital frames + box annotations, pseudonymised)."""
    parser.add_argument("--images", required=True, help="folder holding the frames (stills and/or DICOM)")
    parser.add_argument("--annotations", required=True, help="boxes: CSV (file,x0,y0,x1,y1,label,patient_id"
                        "[,clip_id]) or COCO JSON, in full-frame pixels")
    parser.add_argument("--output", required=True, help="output folder (e.g. datasets/hospital)")
    parser.add_argument("--key-file", default=None,
                        help="file holding the pseudonym key (default: $USDET_PSEUDONYM_KEY); required")
    parser.add_argument("--mapping", default=None,
                        help="write pseudonym -> real path/ID mapping JSON here (must be outside --output)")
    parser.add_argument("--classes", default="lesion", choices=CLASS_CHOICES,
                        help="one 'lesion' class or 'benign,malignant' (labels must then be benign/malignant)")
    parser.add_argument("--split", default="0.7,0.15,0.15", help="train,val,test fractions (default 0.7,0.15,0.15)")
    parser.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    parser.add_argument("--folds", type=int, default=0,
                        help="K-fold cross-validation by patient: --fold is test, the rest train/val (replaces --split)")
    parser.add_argument("--fold", type=int, default=0, help="the test fold with --folds, 0..K-1 (default 0)")
    parser.add_argument("--val-fraction", type=float, default=0.15,
                        help="share of the non-test frames that goes to val with --folds (default 0.15)")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    parser.add_argument("--suppress-marks", action="store_true",
                        help="inpaint burned-in calipers/text/colour marks inside the crop (off by default)")
    parser.add_argument("--min-visible", type=float, default=0.5,
                        help="drop a box when less than this fraction of it lies inside the crop (default 0.5)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run_frames(args: argparse.Namespace) -> int:
    """Hospital frames; exit code 0 ok, 1 nothing converted, 2 bad arguments or inputs."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from usdet.data.frames import AnnotationError, convert_frames
    from usdet.data.privacy import PseudonymKeyError, check_mapping_path, load_key

    try:
        key = load_key(args.key_file)
        if args.mapping:
            check_mapping_path(args.mapping, args.output)
        fractions = parse_fractions(args.split)
        check_folds(args)
    except (PseudonymKeyError, ValueError) as e:
        print(f"frames: {e}", file=sys.stderr)
        return 2
    try:
        report = convert_frames(
            args.images, args.annotations, args.output, key, classes=args.classes.split(","),
            fractions=fractions, seed=args.seed, workers=max(1, args.workers), mapping=args.mapping,
            suppress=args.suppress_marks, min_visible=args.min_visible, progress=not args.no_progress,
            folds=args.folds, fold=args.fold, val_fraction=args.val_fraction)
    except (AnnotationError, FileNotFoundError, NotADirectoryError) as e:
        print(f"frames: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions: one line naming the file; no JSON of this run is left
        where = e.filename or args.output
        print(f"frames: error: cannot write {where}: {e.strerror or e}. The conversion stopped; {args.output} "
              f"holds no report.json, so it is marked incomplete: free space (or fix permissions) and re-run "
              f"the same command", file=sys.stderr)
        return 1
    c = report["counts"]
    print(f"frames: {c['images']} images ({', '.join(f'{s} {c[s]}' for s in SPLITS)}), "
          f"{c['patients']} patients; {c['refused']} refused by the cropper, {c['failed']} failed; "
          f"boxes kept {c['boxes_kept']}, clipped {c['boxes_clipped']}, dropped {c['boxes_dropped']} "
          f"-> {os.path.join(args.output, 'annotations')}")
    return 0 if c["images"] else 1


SUBCOMMANDS = {
    "busi": (add_busi, run_busi, "BUSI (Dataset_BUSI_with_GT): benign/, malignant/, normal/ folders with masks"),
    "breast": (add_breast, run_breast, "BrEaST-Lesions-USG: clinical .xlsx + images with _tumor/_other masks"),
    "busbra": (add_busbra, run_busbra, "BUS-BRA: Images/, Masks/, bus_data.csv, published k-fold files"),
    "masks": (add_masks, run_masks, "generic image + mask folders (optional table, colour-coded masks)"),
    "frames": (add_frames, run_frames, "hospital scanner frames (stills or DICOM) + box annotations, "
                                       "pseudonymised"),
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="dataset", required=True)
    for name, (add, _, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return SUBCOMMANDS[args.dataset][1](args)


if __name__ == "__main__":
    sys.exit(main())
