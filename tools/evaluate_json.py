#!/usr/bin/env python
"""Score saved detections offline: metrics.json, report.md and plots.

  python tools/evaluate_json.py --gt GT.json --pred coco_instances_results.json --output DIR

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
    g.add_argument("--training-metrics", default=None, metavar="METRICS_JSON",
                   help="the run's detectron2 metrics.json: training curves on report.html")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from usdet.evaluation.inputs import EvaluationInputError
    from usdet.evaluation.report import evaluate_predictions

    try:
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
            training_metrics=args.training_metrics,
        )
    except (EvaluationInputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    p, b, f = m["piou"], m["bbox"], m["froc"]

    def fmt(v):
        return "n/a" if v is None or v != v else f"{v:.3f}"

    print(
        f"AP={fmt(b.get('AP'))} AP50={fmt(b.get('AP50'))} piou={fmt(p['score'])} "
        f"(best {fmt(p['best_score'])} at s={p['best_score_thresh']}) CPM={fmt(f['cpm'])} "
        f"image AUC={fmt(m['image_level']['auc'])}"
    )
    if m["warnings"]:
        print(f"{len(m['warnings'])} input problem(s), listed in {args.output}/report.md", file=sys.stderr)
    print(f"wrote {args.output}/metrics.json, report.md and report.html (open it in a browser)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
