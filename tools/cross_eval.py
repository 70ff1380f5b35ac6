#!/usr/bin/env python
"""Evaluate one or several models on several registered datasets: one table and one plot.

  python tools/cross_eval.py --config-file CFG --weights busi=output/busi/model_best.pth \
      --weights mixed=output/mixed/model_best.pth --datasets busi_test breast_test --output DIR \
      [--val-dataset busi_val --target-sensitivity 0.95] [KEY VALUE ...]

Each model runs the engine's --eval-only path on every dataset (full report per cell under
DIR/<model>/inference/<dataset>/); DIR/cross_eval.{json,md,png} hold the models x datasets table
with bootstrap CIs. With --val-dataset, the image-level threshold reaching the target sensitivity
on it is applied to every dataset (sensitivity, specificity). KEY VALUE pairs override the config
(e.g. MODEL.DEVICE cpu). Each model normalizes its input with the PIXEL_MEAN/STD its checkpoint
records (usdet checkpoints do), whatever the config says; cross_eval.md lists them.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-file", required=True, help="the models' config (as for train_net.py)")
    ap.add_argument("--weights", action="append", required=True, metavar="[NAME=]PATH",
                    help="a checkpoint (repeatable); a bare path is named by its folder")
    ap.add_argument("--datasets", nargs="+", required=True, help="registered dataset names, e.g. busi_test breast_test")
    ap.add_argument("--output", required=True, help="output folder")
    ap.add_argument("--val-dataset", default=None, help="choose the image-level operating point on this dataset")
    ap.add_argument("--target-sensitivity", type=float, default=0.95,
                    help="image-level sensitivity the threshold must reach on --val-dataset (default 0.95)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the CIs (default 1000)")
    ap.add_argument("--no-plots", action="store_true", help="skip cross_eval.png")
    ap.add_argument("opts", nargs=argparse.REMAINDER,
                    help="KEY VALUE config overrides, anywhere on the line (after --datasets too), or after --")
    return ap


def main(argv=None) -> int:
    from usdet.utils.overrides import parse_with_overrides

    args = parse_with_overrides(build_parser(), sys.argv[1:] if argv is None else argv)
    from usdet.data.register import ensure_usdet_datasets

    ensure_usdet_datasets()  # registers $USDET_DATASETS/<dataset>_<split>
    from usdet.engine.setup import build_config
    from usdet.evaluation.compare import parse_model_args
    from usdet.experiments.cross_eval import cross_evaluate

    try:
        weights = parse_model_args(args.weights)
        cfg = build_config(args.config_file, ["TEST.BOOTSTRAP", str(args.bootstrap), *args.opts])
        r = cross_evaluate(cfg, weights, args.datasets, args.output, val_dataset=args.val_dataset,
                           target_sensitivity=args.target_sensitivity, plots=not args.no_plots,
                           config_file=args.config_file)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    for row in r["rows"]:
        m = row["metrics"]
        print(f"{row['model']} on {row['dataset']}: AP50={m['AP50']['estimate']} piou={m['penalized IoU']['estimate']}")
    print(f"wrote {args.output}/cross_eval.json and {args.output}/cross_eval.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
