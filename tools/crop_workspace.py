#!/usr/bin/env python
"""Crop the scanner workspace off every frame in a folder (PNG, JPEG, BMP, TIFF, DICOM).

  python tools/crop_workspace.py --input DIR --output DIR2 [--workers N] [--suppress-marks]

Writes the crops under DIR2 with the same relative paths (DICOM frames as ``<file>.frameNNNN.png``)
and DIR2/crops.json: ``{"<relative path>[#frame]": {"box": [x0, y0, x1, y1] | null, "reason": ...,
"confidence": c}}``. Refused frames (no confident image region) are listed but not written.
DICOM frames whose header has ultrasound regions are cropped to them (reason "dicom ultrasound
region ..."). A dual-view frame (two images split by a line) gives one crop per view, keyed
``<key>@view<k>`` (k = 0 left/top) and written as ``<name>.view<k>.png``; each entry names its
``frame``. >8-bit DICOM data is scaled once per file (``grey_scale`` in the entry).
"""
import argparse
import sys

from usdet.utils.known_warnings import silence_known_warnings

silence_known_warnings()  # before torch/detectron2 print their deprecations

from usdet.data.crop_folder import crop_directory, summarize_crops  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="folder of frames (searched recursively)")
    ap.add_argument("--output", required=True, help="folder for the crops and crops.json")
    ap.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    ap.add_argument("--suppress-marks", action="store_true",
                    help="inpaint burned-in calipers/text/colour marks inside each crop (off by default)")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = ap.parse_args(argv)
    try:
        entries = crop_directory(args.input, args.output, workers=max(1, args.workers),
                                 suppress=args.suppress_marks, progress=not args.no_progress)
    except NotADirectoryError as e:
        print(f"crop_workspace: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions: one line naming the file, no crops.json written
        where = e.filename or args.output
        print(f"crop_workspace: error: cannot write {where}: {e.strerror or e}. Stopped; {args.output} has no "
              f"new crops.json: free space (or fix permissions) and re-run", file=sys.stderr)
        return 1
    c = summarize_crops(entries)
    print(f"crop_workspace: {len(entries)} frames: cropped {c['cropped']}, refused {c['refused']}, "
          f"failed {c['failed']} -> {args.output}/crops.json")
    return 0 if c["cropped"] else 1


if __name__ == "__main__":
    sys.exit(main())
