#!/usr/bin/env python
"""Score saved detections offline: metrics.json, report.md and plots.

  python tools/evaluate_json.py --gt GT.json --pred coco_instances_results.json --output DIR

  python tools/evaluate_json.py --gt GT.json --pred P.json --output DIR --by device --by size
  python tools/evaluate_json.py --gt TEST.json --pred P.json --output DIR \
      --val-gt VAL.json --val-pred VAL_P.json --target-sensitivity 0.95

PRED is detectron2's ``coco_instances_results.json`` (a list of ``{image_id, category_id,
bbox [x, y, w, h], score}``). Writes ``DIR/metrics.json`` (COCO AP, penalized IoU, FROC,
image-level and malignancy ROC, bootstrap CIs), ``DIR/report.md``, PNG plots and ``DIR/report.html``
(one self-contained page of all of it, with the worst false positives and misses). Problems in the
inputs are listed (file and problem) and the valid rest is still scored.
"""
import argparse
import logging
import sys

from usdet.utils.known_warnings import silence_known_warnings

silence_known_warnings()  # before torch/detectron2 print their deprecations


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gt", required=True, help="COCO ground-truth JSON (e.g. datasets/busi/annotations/test.json)")
    ap.add_argument("--pred", required=True, help="detections JSON (detectron2 coco_instances_results.json)")
    ap.add_argument("--output", required=True, help="output folder for metrics.json, report.md and plots")
    g = ap.add_argument_group("penalized IoU")
    g.add_argument("--piou-score-thresh", type=float, default=0.45, help="score threshold s (default 0.45)")
    g.add_argument("--piou-iou-thresh", type=float, default=0.0, help="IoU threshold t for a match (default 0)")
    g.add_argument("--piou-topk", type=int, default=1, help="predictions kept per image (default 1)")
    g.add_argument("--piou-class-aware", action="store_true", help="a prediction matches only truth of its class")
    g = ap.add_argument_group("FROC")
    g.add_argument("--froc-hit", choices=("iou", "center"), default="iou",
                   help="hit rule: IoU >= --froc-iou (default) or box centre inside the truth box")
    g.add_argument("--froc-iou", type=float, default=0.5, help="IoU of a hit with --froc-hit iou (default 0.5)")
    g = ap.add_argument_group("image level, bootstrap, output")
    g.add_argument("--score-thresh", type=float, default=None,
                   help="score threshold of the image-level calls (default: --piou-score-thresh)")
    g.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% CIs, 0 = none (default 1000)")
    g.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g.add_argument("--title", default=None, help="report title")
    g = ap.add_argument_group("subgroups and operating point")
    g.add_argument("--by", action="append", default=[], metavar="ATTR",
                   help="one table per image attribute (repeatable): device, label, birads, size "
                        "(lesion size in mm where images have pixel_size_cm, else px), or any image key")
    g.add_argument("--val-gt", default=None, help="validation ground truth: choose the operating point on it")
    g.add_argument("--val-pred", default=None, help="detections on --val-gt")
    g.add_argument("--target-sensitivity", type=float, default=0.95,
                   help="image-level sensitivity the val threshold must reach (default 0.95)")
    g.add_argument("--training-metrics", default=None, metavar="METRICS_JSON",
                   help="the run's detectron2 metrics.json: training curves on report.html")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from usdet.evaluation.inputs import EvaluationInputError
    from usdet.evaluation.report import evaluate_predictions

    if (args.val_gt is None) != (args.val_pred is None):
        print("error: --val-gt and --val-pred go together", file=sys.stderr)
        return 2
    try:
        op = None
        if args.val_gt:
            from usdet.evaluation.operating_point import operating_point_from_files

            op = operating_point_from_files(args.val_gt, args.val_pred, args.target_sensitivity)
        m = evaluate_predictions(
            args.gt,
            args.pred,
            args.output,
            piou_score_thresh=args.piou_score_thresh,
            piou_iou_thresh=args.piou_iou_thresh,
            piou_topk=args.piou_topk,
            piou_class_aware=args.piou_class_aware,
            froc_hit=args.froc_hit,
            froc_iou=args.froc_iou,
            score_thresh=args.score_thresh,
            bootstrap=args.bootstrap,
            seed=args.seed,
            plots=not args.no_plots,
            title=args.title,
            by=args.by,
            operating_point=op,
            training_metrics=args.training_metrics,
        )
    except (EvaluationInputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from usdet.evaluation.formatting import fmt_number

    p, b, f = m["piou"], m["bbox"], m["froc"]

    def fmt(v):
        return fmt_number(v, ".3f")

    print(
        f"AP={fmt(b.get('AP'))} AP50={fmt(b.get('AP50'))} piou={fmt(p['score'])} "
        f"(best {fmt(p['best_score'])} at s={p['best_score_thresh']}) CPM={fmt(f['cpm'])} "
        f"image AUC={fmt(m['image_level']['auc'])}"
    )
    if "operating_point" in m:
        o = m["operating_point"]
        print(f"operating point s={o['score_thresh']:.4f} (val sensitivity {fmt(o['val']['sensitivity'])}): "
              f"test sensitivity {fmt(o['test']['sensitivity'])}, specificity {fmt(o['test']['specificity'])}")
    if m["warnings"]:
        print(f"{len(m['warnings'])} input problem(s), listed in {args.output}/report.md", file=sys.stderr)
    print(f"wrote {args.output}/metrics.json, report.md and report.html (open it in a browser)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
