#!/usr/bin/env python
"""Train the issue's "plain detectron2" baseline: stock DefaultTrainer, model-zoo config, no usdet.

  python benchmarks/train_plain_baseline.py --output DIR [KEY VALUE ...]

The baseline to beat (issue 7): COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml from random init with
BN in backbone and FPN, one class, negatives kept, short side 256-320 (test 320), batch 4,
LR 0.02 with 100 warmup iterations, gradient clipping (norm 1.0), 680 iterations with steps at
510 and 612. usdet only supplies the dataset names (``ensure_usdet_datasets``); training is stock
detectron2, so the comparison measures usdet's recipe, not a re-implementation of the baseline.
Evaluate it afterwards with ``tools/train_net.py --eval-only --config-file DIR/config.yaml
MODEL.WEIGHTS DIR/model_final.pth INPUT.NORMALIZATION config``.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from usdet.data.register import ensure_usdet_datasets  # noqa: E402
from detectron2 import model_zoo  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.engine import DefaultTrainer, default_setup  # noqa: E402

BASELINE = [
    "MODEL.WEIGHTS", "",
    "MODEL.RESNETS.NORM", "BN", "MODEL.FPN.NORM", "BN",
    "MODEL.ROI_HEADS.NUM_CLASSES", "1",
    "DATALOADER.FILTER_EMPTY_ANNOTATIONS", "False",
    "DATASETS.TRAIN", "('busi_train',)", "DATASETS.TEST", "()",
    "INPUT.MIN_SIZE_TRAIN", "(256, 288, 320)", "INPUT.MAX_SIZE_TRAIN", "512",
    "INPUT.MIN_SIZE_TEST", "320", "INPUT.MAX_SIZE_TEST", "512",
    "SOLVER.IMS_PER_BATCH", "4", "SOLVER.BASE_LR", "0.02", "SOLVER.WARMUP_ITERS", "100",
    "SOLVER.CLIP_GRADIENTS.ENABLED", "True", "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "norm",
    "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "1.0",
    "SOLVER.MAX_ITER", "680", "SOLVER.STEPS", "(510, 612)", "SOLVER.CHECKPOINT_PERIOD", "100000",
    "TEST.EVAL_PERIOD", "0", "SEED", "0",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True)
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="extra KEY VALUE overrides (e.g. MODEL.DEVICE cpu)")
    args = ap.parse_args()
    ensure_usdet_datasets()  # busi_train/val/test from $USDET_DATASETS
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml"))
    cfg.merge_from_list(BASELINE + ["OUTPUT_DIR", args.output] + list(args.opts))
    cfg.freeze()
    default_setup(cfg, argparse.Namespace(config_file="", eval_only=False, opts=[]))
    trainer = DefaultTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
