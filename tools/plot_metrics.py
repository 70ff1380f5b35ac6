#!/usr/bin/env python
"""Training curves from detectron2's event file(s): each loss, LR, validation loss, eval metrics.

  python tools/plot_metrics.py output/busi_r50/metrics.json --output curves.png
  python tools/plot_metrics.py stage1=output/busi_r50/metrics.json \\
      stage2=output/hospital_from_busi/metrics.json --output curves.png

Several runs go on one figure; by default one after the other on the iteration axis (stage 2
restarts at iteration 0 on its own schedule), ``--overlay`` draws them all from 0. A partial
last line (a run killed mid-write) is skipped with a message.
"""
import argparse
import os
import sys

from usdet.utils.known_warnings import silence_known_warnings

silence_known_warnings()  # before torch/detectron2 print their deprecations


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="[LABEL=]METRICS_JSON",
                    help="detectron2 metrics.json files (a run folder also works), optionally labelled")
    ap.add_argument("--output", default="training_curves.png", help="PNG to write (default training_curves.png)")
    ap.add_argument("--overlay", action="store_true", help="draw every run from iteration 0 instead of in sequence")
    ap.add_argument("--keys", nargs="*", default=None, help="only these keys or key prefixes (e.g. loss_cls bbox/)")
    args = ap.parse_args(argv)

    from usdet.evaluation.plots import plot_training_curves, read_event_metrics

    runs = {}
    for i, spec in enumerate(args.runs):
        label, sep, path = spec.partition("=")
        if not sep:
            label, path = "", spec
        if os.path.isdir(path):
            path = os.path.join(path, "metrics.json")
        label = label or (os.path.basename(os.path.dirname(os.path.abspath(path))) or f"run{i + 1}")
        if label in runs:
            label = f"{label} ({i + 1})"
        try:
            records, problems = read_event_metrics(path)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for p in problems:
            print(f"warning: {p}", file=sys.stderr)
        if not records:
            print(f"error: {path}: no readable records", file=sys.stderr)
            return 2
        runs[label] = records
    try:
        out = plot_training_curves(runs, args.output, sequential=not args.overlay, keys=args.keys)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
