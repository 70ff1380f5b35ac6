#!/usr/bin/env python
"""K-fold cross-validation of a training recipe on a converted dataset.

  python tools/cross_validate.py --config-file CFG --dataset-root datasets/busi --folds 5 --output DIR
  python tools/cross_validate.py ... --print-commands     # shell lines for a cluster, runs nothing

Pools the dataset's images (all splits), deals them into K group-aware folds (DIR/folds/fold<k>/
annotations/{train,val,test}.json, the images linked, not copied), trains each fold with
tools/train_net.py (OUTPUT_DIR DIR/fold<k>), evaluates its best checkpoint on its test fold,
and writes DIR/cv_summary.{json,md,png}: per-fold metrics, mean ± sd, and the pooled out-of-fold
predictions (DIR/pooled_gt.json, DIR/pooled_predictions.json) with bootstrap CIs. Run the same
command again after a kill: finished folds are skipped, the unfinished one resumes from its last
checkpoint. Trailing KEY VALUE pairs override the config of every fold.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-file", required=True, help="training config (as for train_net.py)")
    ap.add_argument("--dataset-root", required=True, help="a converted dataset folder (with annotations/*.json)")
    ap.add_argument("--folds", type=int, default=5, help="number of folds K (default 5)")
    ap.add_argument("--output", required=True, help="output folder of the whole cross-validation")
    ap.add_argument("--seed", type=int, default=0, help="seed of the fold assignment (default 0)")
    ap.add_argument("--val-fraction", type=float, default=0.15,
                    help="fraction of each fold's training images kept for validation (default 0.15)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the CIs (default 1000)")
    ap.add_argument("--print-commands", action="store_true",
                    help="write the folds and print each fold's train/test commands instead of running them")
    ap.add_argument("--in-process", action="store_true",
                    help="run each fold's training and test in this process (the same config through the "
                         "engine) instead of one train_net subprocess per run (no start-up cost)")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from usdet.experiments import crossval

    try:
        if not os.path.isfile(args.config_file):
            raise FileNotFoundError(f"{args.config_file}: config file not found")
        if args.print_commands:
            crossval.write_folds(args.dataset_root, args.output, args.folds, args.seed, args.val_fraction)
            sys.stdout.write(crossval.print_commands(os.path.abspath(args.config_file), args.output, args.folds,
                                                     args.opts, args.bootstrap))
            return 0
        s = crossval.run_cross_validation(os.path.abspath(args.config_file), args.dataset_root, args.output,
                                          args.folds, seed=args.seed, val_fraction=args.val_fraction,
                                          opts=args.opts, bootstrap=args.bootstrap, plots=not args.no_plots,
                                          in_process=args.in_process)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for label, v in s["mean_sd"].items():
        p = s["pooled"]["metrics"][label]
        print(f"{label}: mean {v['mean']:.4g} ± {v['sd']:.4g} over folds; pooled {p['estimate']}")
    print(f"wrote {args.output}/cv_summary.json and {args.output}/cv_summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
