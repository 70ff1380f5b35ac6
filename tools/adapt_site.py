#!/usr/bin/env python
"""Adapt a trained model to a new site's unlabelled frames; write a checkpoint used like any other.

  python tools/adapt_site.py --config-file CFG --weights W.pth --images DIR [DIR ...] --output W_ADAPTED.pth \\
      [--method adabn|pixel-stats|pixel-stats+adabn] [--scope backbone|backbone+fpn|all] [--max-images N] \\
      [--batch-size B] [--blend A] [--source-pixel-stats pixel_stats.json] [--val-dataset NAME [--require-gain]] \\
      [--no-crop] [--device cpu|cuda] [KEY VALUE ...]

Frames (images, folders, DICOM) are cropped by usdet's cropper like predict.py's, then the BatchNorm
statistics (AdaBN, fvcore's update_bn_stats) and/or the input normalization are re-estimated on
them. The checkpoint records what was adapted, on how many frames, from which folder (as given,
no image file name) and with which parameters; train_net.py --eval-only, predict.py, cross_eval.py
and export_model.py load it with the same config. No labels are used, so the tool cannot tell
whether the adaptation helps: it says so, and with --val-dataset (a registered labelled dataset of
the site) it evaluates before and after, paired, and claims a gain only when the AP50 interval is
above zero (--require-gain: write the checkpoint only then). Exit 0 on success, 1 when
--require-gain held the checkpoint back, 2 on bad input.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from usdet.utils.known_warnings import silence_known_warnings  # noqa: E402

silence_known_warnings()

METHODS = ("adabn", "pixel-stats", "pixel-stats+adabn")  # usdet.experiments.adapt.METHODS (not imported: fast --help)
SCOPES = ("backbone", "backbone+fpn", "all")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="the model's config (e.g. the run's config.yaml)")
    p.add_argument("--weights", required=True, help="checkpoint to adapt, e.g. output/run/model_best.pth")
    p.add_argument("--images", required=True, nargs="+", help="the new site's unlabelled frames: folders, images, DICOM")
    p.add_argument("--output", required=True, help="adapted checkpoint to write (.pth)")
    p.add_argument("--method", default="adabn", choices=METHODS,
                   help="adabn: BatchNorm statistics; pixel-stats: input normalization; or both (default adabn)")
    p.add_argument("--scope", default="backbone+fpn", choices=SCOPES,
                   help="BatchNorm layers re-estimated: the ResNet, ResNet + FPN (default), or every one")
    p.add_argument("--max-images", type=int, default=0, help="frames used, drawn at random by source (0 = all)")
    p.add_argument("--batch-size", type=int, default=0, help="frames per BatchNorm batch (0 = SOLVER.IMS_PER_BATCH)")
    p.add_argument("--blend", type=float, default=1.0,
                   help="weight of the site's BatchNorm statistics against the training ones (default 1: AdaBN)")
    p.add_argument("--source-pixel-stats", default=None,
                   help="the training split's pixel_stats.json (needed for pixel-stats unless the config uses "
                        "INPUT.NORMALIZATION dataset)")
    p.add_argument("--seed", type=int, default=0, help="seed of the frame draw (default 0)")
    p.add_argument("--no-crop", action="store_true", help="frames are already cropped: use them whole")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: the config's MODEL.DEVICE")
    p.add_argument("--val-dataset", default=None,
                   help="registered labelled dataset of the site: evaluate before/after, paired")
    p.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples of --val-dataset's check")
    p.add_argument("--require-gain", action="store_true",
                   help="with --val-dataset: write the checkpoint only if AP50 improves (interval above 0)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("opts", nargs=argparse.REMAINDER,
                   help="config overrides: KEY VALUE anywhere on the line (after --images too), or after --")
    return p


def main(argv=None) -> int:
    from usdet.utils.overrides import parse_with_overrides

    args = parse_with_overrides(build_parser(), sys.argv[1:] if argv is None else argv)
    if args.require_gain and not args.val_dataset:
        print("adapt_site: error: --require-gain needs --val-dataset (a labelled dataset of the site)", file=sys.stderr)
        return 2
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from usdet.data.register import ensure_usdet_datasets
    from usdet.experiments.adapt import AdaptError, adapt_site, describe

    ensure_usdet_datasets()
    opts = [o for o in (args.opts or []) if o != "--"]
    try:
        r = adapt_site(args.config_file, args.weights, args.images, args.output, method=args.method,
                       scope=args.scope, max_images=args.max_images, batch_size=args.batch_size, blend=args.blend,
                       seed=args.seed, crop=not args.no_crop, source_pixel_stats=args.source_pixel_stats,
                       device=args.device, opts=opts, val_dataset=args.val_dataset, bootstrap=args.bootstrap,
                       require_gain=args.require_gain, progress=not args.no_progress)
    except (AdaptError, FileNotFoundError, RuntimeError, ValueError, KeyError) as e:
        msg = str(e.args[0] if isinstance(e, KeyError) and e.args else e).strip().splitlines()
        print(f"adapt_site: error: {msg[0] if msg else type(e).__name__}", file=sys.stderr)
        return 2
    print(f"adapted: {describe(r)} in {r['seconds']:.1f} s")
    check = r.get("val_check")
    if check is None:
        print(f"WARNING: {r['warning']}", file=sys.stderr)
    else:
        a = check["AP50"]
        print(f"on {check['dataset']} ({check['num_images']} images, paired): AP50 {a['before']:.1f} -> {a['after']:.1f}, "
              f"delta {a['delta']:+.1f} [{a['low']:+.1f}, {a['high']:+.1f}]: {check['verdict']}"
              + ("" if check["verdict"] == "gain" else " (no gain shown: keep the unadapted model unless other "
                                                       "labelled checks say otherwise)"))
    if not r["written"]:
        print(f"not written: --require-gain and the verdict is '{r['verdict']}'", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
