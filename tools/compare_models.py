#!/usr/bin/env python
"""Paired comparison of two models' detections on the same ground truth.

  python tools/compare_models.py --gt GT.json --pred A=a.json --pred B=b.json --output OUT [--bootstrap 2000]

Writes OUT/comparison.json (per metric: each model's value and delta = second - first with its
95% CI and two-sided p), OUT/comparison.md and OUT/comparison.png. AP50, AP, penalized IoU and
CPM by a paired bootstrap over images; image-level ROC AUC by DeLong's test.
"""
import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gt", required=True, help="COCO ground-truth JSON")
    ap.add_argument("--pred", action="append", required=True, metavar="NAME=PATH",
                    help="detections JSON of one model (give it twice: first, then second)")
    ap.add_argument("--output", required=True, help="output folder")
    ap.add_argument("--bootstrap", type=int, default=2000, help="paired bootstrap resamples (default 2000)")
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    ap.add_argument("--piou-score-thresh", type=float, default=0.45, help="penalized IoU score threshold (default 0.45)")
    ap.add_argument("--froc-hit", choices=("iou", "center"), default="iou", help="FROC hit rule (default iou)")
    ap.add_argument("--froc-iou", type=float, default=0.5, help="IoU of a FROC hit (default 0.5)")
    ap.add_argument("--no-plots", action="store_true", help="skip comparison.png")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from usdet.evaluation.compare import EvaluationInputError, compare_models, extended_notes, parse_model_args

    try:
        preds = parse_model_args(args.pred)
        if len(preds) != 2:
            raise ValueError(f"give --pred exactly twice (got {len(preds)})")
        c = compare_models(args.gt, preds, args.output, n_resamples=args.bootstrap, seed=args.seed,
                           piou_score_thresh=args.piou_score_thresh, froc_hit=args.froc_hit,
                           froc_iou=args.froc_iou, plots=not args.no_plots)
    except (EvaluationInputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from usdet.evaluation.formatting import fmt_number

    def _num(x, spec: str) -> str:
        return fmt_number(x, spec, undefined="undefined")

    a, b = c["models"]
    for k, v in c["metrics"].items():
        d = v["delta"]
        print(f"{k}: {a}={_num(v['values'][a], '.4f')} {b}={_num(v['values'][b], '.4f')} "
              f"delta={_num(d['estimate'], '+.4f')} [{_num(d['low'], '+.4f')}, {_num(d['high'], '+.4f')}] "
              f"p={_num(d['p_value'], '.4g')} ({d['method']})")
    for note in extended_notes(c):
        print(f"note: {note}")
    print(f"wrote {args.output}/comparison.json and {args.output}/comparison.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
