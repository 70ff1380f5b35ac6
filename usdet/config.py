"""usdet's additions to detectron2's config (``add_usdet_config``), as PointRend/DensePose do.

Every knob of usdet's evaluator, best-model hook, normalization, validation loss and
augmentation lives here, so a run is fully described by its YAML file plus overrides.
"""
from __future__ import annotations

from detectron2.config import CfgNode as CN


def add_usdet_config(cfg: CN) -> None:
    """Add usdet's config keys (with defaults) to a detectron2 config, in place."""
    _C = cfg

    # Penalized IoU evaluator (usdet/evaluation/penalized_iou.py).
    _C.TEST.PIOU = CN()
    _C.TEST.PIOU.SCORE_THRESH = 0.45
    _C.TEST.PIOU.IOU_THRESH = 0.0
    _C.TEST.PIOU.TOPK = 1
    _C.TEST.PIOU.CLASS_AWARE = False

    # Optional validation loss (losses on DATASETS.TEST in train mode, no gradient); 0 = off.
    _C.TEST.VAL_LOSS_PERIOD = 0

    # Best-model checkpoint: keep model_best.pth by a flattened eval key.
    _C.SOLVER.BEST_CHECKPOINT = CN()
    _C.SOLVER.BEST_CHECKPOINT.ENABLED = True
    _C.SOLVER.BEST_CHECKPOINT.METRIC = "piou/score"
    _C.SOLVER.BEST_CHECKPOINT.MODE = "max"

    # Input normalization, applied once: "imagenet" (detectron2's PIXEL_MEAN/STD as given) or
    # "dataset" (mean/std of the training split read from INPUT.NORMALIZATION_FILE, written by
    # the converter as OUT/pixel_stats.json).
    _C.INPUT.NORMALIZATION = "imagenet"
    _C.INPUT.NORMALIZATION_FILE = ""

    # Ultrasound augmentation (usdet/data/augment.py); all off by default = detectron2's stock.
    _C.INPUT.AUG = CN()
    _C.INPUT.AUG.HFLIP = True
    _C.INPUT.AUG.VFLIP = False
    _C.INPUT.AUG.BRIGHTNESS = 0.0  # e.g. 0.2 -> intensity scale in [0.8, 1.2]
    _C.INPUT.AUG.CONTRAST = 0.0
    _C.INPUT.AUG.GAMMA = 0.0  # e.g. 0.3 -> gamma in [0.7, 1.3]
    _C.INPUT.AUG.SPECKLE = 0.0  # std of multiplicative speckle-like noise
    _C.INPUT.AUG.RANDOM_RESIZED_CROP = CN()
    _C.INPUT.AUG.RANDOM_RESIZED_CROP.ENABLED = False
    _C.INPUT.AUG.RANDOM_RESIZED_CROP.SCALE = (0.6, 1.0)

    # Weight EMA for evaluation (off by default).
    _C.MODEL.EMA = CN()
    _C.MODEL.EMA.ENABLED = False
    _C.MODEL.EMA.DECAY = 0.999

    # Test-time horizontal flip (off by default).
    _C.TEST.FLIP = False
