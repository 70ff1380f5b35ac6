"""usdet's additions to detectron2's config (``add_usdet_config``), as PointRend/DensePose do.

Every knob of usdet's evaluator, best-model hook, normalization, validation loss and
augmentation lives here, so a run is fully described by its YAML file plus overrides.
``resolve_normalization`` turns the one normalization choice into ``MODEL.PIXEL_MEAN/STD``.
"""
from __future__ import annotations

import json
import os
from typing import List, Tuple

from detectron2.config import CfgNode as CN

# ImageNet statistics on the 0-255 scale, RGB order (torchvision's convention).
IMAGENET_MEAN_RGB = (123.675, 116.28, 103.53)
IMAGENET_STD_RGB = (58.395, 57.12, 57.375)
NORMALIZATIONS = ("imagenet", "dataset", "config")


def add_usdet_config(cfg: CN) -> None:
    """Add usdet's config keys (with defaults) to a detectron2 config, in place."""
    _C = cfg

    # Training on several sources (usdet/data/mixing.py): one positive weight per DATASETS.TRAIN
    # entry = the probability that a training sample comes from that dataset (normalized); empty =
    # plain concatenation (every image equally likely). Classes are reconciled by name.
    _C.DATASETS.TRAIN_WEIGHTS = ()

    # Penalized IoU evaluator (usdet/evaluation/penalized_iou.py).
    _C.TEST.PIOU = CN()
    _C.TEST.PIOU.SCORE_THRESH = 0.45
    _C.TEST.PIOU.IOU_THRESH = 0.0
    _C.TEST.PIOU.TOPK = 1
    _C.TEST.PIOU.CLASS_AWARE = False
    # Bootstrap resamples for the confidence intervals of the --eval-only report (0 = none).
    _C.TEST.BOOTSTRAP = 0

    # Optional validation loss (losses on DATASETS.TEST in train mode, no gradient); 0 = off.
    _C.TEST.VAL_LOSS_PERIOD = 0

    # Best-model checkpoint: keep model_best.pth by a flattened eval key (e.g. "bbox/AP50").
    _C.SOLVER.BEST_CHECKPOINT = CN()
    _C.SOLVER.BEST_CHECKPOINT.ENABLED = True
    _C.SOLVER.BEST_CHECKPOINT.METRIC = "piou/score"
    _C.SOLVER.BEST_CHECKPOINT.MODE = "max"

    # Wall-clock training budget in minutes (usdet/engine/budget.py); 0 = off (iterations rule).
    # When > 0 the LR schedule's shape (SOLVER.LR_SCHEDULER_NAME; STEPS read as fractions
    # STEPS/MAX_ITER) follows the elapsed fraction of the budget instead of iteration/MAX_ITER
    # (warmup stays WARMUP_ITERS iterations), and the first step that starts with the budget spent
    # is the last (final checkpoint + final evaluation). Elapsed = the training loop's wall clock,
    # its periodic evaluations and checkpoints included; it is stored in every checkpoint, so
    # --resume continues it. SOLVER.MAX_ITER stays an upper bound.
    _C.SOLVER.TIME_BUDGET_MIN = 0.0

    # Input normalization, applied once (by the model, from MODEL.PIXEL_MEAN/STD):
    #   "imagenet": ImageNet mean/std (0-255), reordered to INPUT.FORMAT;
    #   "dataset":  mean/std of the training split from INPUT.NORMALIZATION_FILE (the converter's
    #               OUT/pixel_stats.json, RGB 0-255), reordered to INPUT.FORMAT; with several
    #               DATASETS.TRAIN, comma-separated files in the same order, combined into the
    #               statistics of the mix actually sampled (weighted by DATASETS.TRAIN_WEIGHTS, or
    #               by each file's num_images without weights);
    #   "config":   MODEL.PIXEL_MEAN/STD exactly as written (e.g. detectron2's MSRA weights need
    #               BGR ImageNet mean and std 1).
    # resolve_normalization() writes the result into MODEL.PIXEL_MEAN/STD and sets
    # INPUT.NORMALIZATION_RESOLVED, so a saved config.yaml reloads without the stats file.
    _C.INPUT.NORMALIZATION = "imagenet"
    _C.INPUT.NORMALIZATION_FILE = ""
    _C.INPUT.NORMALIZATION_RESOLVED = False
    # A checkpoint written by usdet records the PIXEL_MEAN/STD its weights were trained with
    # (usdet_normalization); evaluation, prediction, export, Grad-CAM and cross_eval use those,
    # with one warning line where this config's differ. False forces this config's (e.g. to try
    # another site's statistics on a trained model). Training always uses the config's.
    _C.INPUT.NORMALIZATION_FROM_CHECKPOINT = True

    # Ultrasound augmentation (usdet/data/augment.py). Flips come from here (detectron2's
    # INPUT.RANDOM_FLIP is not used by usdet's mapper); photometric ones are off by default.
    _C.INPUT.AUG = CN()
    _C.INPUT.AUG.HFLIP = True
    _C.INPUT.AUG.VFLIP = False
    _C.INPUT.AUG.BRIGHTNESS = 0.0  # e.g. 0.2 -> intensity scale in [0.8, 1.2]
    _C.INPUT.AUG.CONTRAST = 0.0  # e.g. 0.2 -> contrast scale in [0.8, 1.2]
    _C.INPUT.AUG.GAMMA = 0.0  # e.g. 0.3 -> gamma in [0.7, 1.3]
    _C.INPUT.AUG.SPECKLE = 0.0  # std of multiplicative speckle-like noise, e.g. 0.1
    _C.INPUT.AUG.RANDOM_RESIZED_CROP = CN()
    _C.INPUT.AUG.RANDOM_RESIZED_CROP.ENABLED = False
    _C.INPUT.AUG.RANDOM_RESIZED_CROP.SCALE = (0.6, 1.0)  # crop area, fraction of the image
    _C.INPUT.AUG.RANDOM_RESIZED_CROP.RATIO = (0.75, 1.333)  # crop aspect ratio (w/h)
    _C.INPUT.AUG.RANDOM_RESIZED_CROP.PROB = 0.5  # chance that an image is cropped at all
    _C.INPUT.AUG.RANDOM_RESIZED_CROP.KEEP_BOXES = True  # only crops holding every box whole
    # Multi-image augmentations (training only; boxes and ignore regions stay exact, none is cut).
    # Mosaic: 4 training images in a 2x2 canvas, each whole at a random place in its quarter; the
    # canvas is resized CANVAS_SCALE times the single-image train size (tiles at CANVAS_SCALE/2;
    # 1.0 costs what a single image costs, larger values cost CANVAS_SCALE**2 as much).
    _C.INPUT.AUG.MOSAIC = CN()
    _C.INPUT.AUG.MOSAIC.ENABLED = False
    _C.INPUT.AUG.MOSAIC.PROB = 0.5
    _C.INPUT.AUG.MOSAIC.CANVAS_SCALE = 1.0
    # Copy-paste: one lesion of another training image (its box plus a feathered margin), scaled by
    # a factor in SCALE, pasted where it overlaps no box or ignore region (not applied to mosaics).
    _C.INPUT.AUG.COPY_PASTE = CN()
    _C.INPUT.AUG.COPY_PASTE.ENABLED = False
    _C.INPUT.AUG.COPY_PASTE.PROB = 0.5
    _C.INPUT.AUG.COPY_PASTE.SCALE = (0.8, 1.2)

    # Scanner-style augmentation (usdet/data/augment.py, build_scanner_augmentation; issue 24),
    # all off by default. Each enabled one applies to a training image with probability PROB.
    _C.INPUT.AUG.SCANNER = CN()
    _C.INPUT.AUG.SCANNER.PROB = 0.5
    _C.INPUT.AUG.SCANNER.DEPTH_GAIN = 0.0  # time-gain curve: gains in [1 - x, 1 + x] at DEPTH_GAIN_POINTS depths
    _C.INPUT.AUG.SCANNER.DEPTH_GAIN_POINTS = 4
    _C.INPUT.AUG.SCANNER.SPECKLE_GRAIN = 0.0  # std of re-grained multiplicative speckle, e.g. 0.15
    _C.INPUT.AUG.SCANNER.SPECKLE_GRAIN_SIZE = (0.5, 2.5)  # grain sigma range (pixels), per axis
    _C.INPUT.AUG.SCANNER.RESOLUTION = 1.0  # resolution loss: resampled at a scale in [x, 1] (1 = off)
    _C.INPUT.AUG.SCANNER.BLUR = 0.0  # Gaussian blur sigma in [0, x] pixels
    _C.INPUT.AUG.SCANNER.LOG_COMPRESSION = 0.0  # |k| of the log/exp display curve up to x (e.g. 4)
    _C.INPUT.AUG.SCANNER.JPEG_QUALITY = 0  # JPEG export at a quality in [x, 95] (0 = off)
    _C.INPUT.AUG.SCANNER.SECTOR = False  # black outside a convex-probe sector that holds every box
    _C.INPUT.AUG.SCANNER.SECTOR_ANGLE = (30.0, 50.0)  # sector half-angle range, degrees
    _C.INPUT.AUG.SCANNER.TEXT = False  # burnt-in scanner text, placed off every box
    _C.INPUT.AUG.SCANNER.TEXT_ITEMS = 4  # at most this many snippets per image

    # Weight EMA (usdet/engine/hooks.py EMAHook), off by default: periodic evaluation and
    # model_best.pth use the averaged weights; checkpoints carry the average for --resume.
    _C.MODEL.EMA = CN()
    _C.MODEL.EMA.ENABLED = False
    _C.MODEL.EMA.DECAY = 0.999

    # Test-time horizontal flip (off by default): original + flipped image at the test size,
    # merged by detectron2's GeneralizedRCNNWithTTA. TEST.AUG.ENABLED gives its multi-scale set.
    _C.TEST.FLIP = False

    # Clips (tools/predict.py --clip; usdet/engine/tracking.py): detections with score >= MIN_SCORE
    # are linked into tracks (IoU >= TRACK_IOU with a track's predicted box; a track ends after
    # MAX_GAP unseen frames). Temporal decision (k of n with a smoothed score): a box's window is
    # the WINDOW frames centred on it; it counts when at least MIN_HITS of them hold a detection
    # with score >= HIT_SCORE, and its score is the track's mean detection score over the window
    # (missed frames count 0). DECISION "window": a box is a lesion box when its own window score
    # is >= SCORE_THRESH; "track": when its track's best window score is (all boxes of a track
    # together). Chosen on 20 synthetic val clips by benchmarks/bench_clips.py (2026-12-07; README
    # "Clips"): fewest false positives per lesion-free frame at the single-frame rule's sensitivity
    # among the settings that find the most lesions.
    _C.CLIP = CN()
    _C.CLIP.MIN_SCORE = 0.05
    _C.CLIP.TRACK_IOU = 0.3
    _C.CLIP.MAX_GAP = 5
    _C.CLIP.WINDOW = 5
    _C.CLIP.MIN_HITS = 2
    _C.CLIP.HIT_SCORE = 0.2
    _C.CLIP.SCORE_THRESH = 0.5
    _C.CLIP.DECISION = "window"


def _to_format(rgb: List[float], fmt: str) -> List[float]:
    fmt = fmt.upper()
    if fmt == "RGB":
        return list(rgb)
    if fmt == "BGR":
        return list(rgb[::-1])
    raise ValueError(f"INPUT.FORMAT {fmt!r} is not supported by usdet normalization (use RGB or BGR)")


def read_pixel_stats(path: str) -> Tuple[List[float], List[float]]:
    """Read a converter's ``pixel_stats.json`` -> (mean RGB, std RGB) on the 0-255 scale."""
    try:
        with open(path, "r", encoding="utf-8") as fh:
            stats = json.load(fh)
        mean = [float(v) for v in stats["mean"]]
        std = [float(v) for v in stats["std"]]
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: INPUT.NORMALIZATION_FILE not found (the converter writes "
                                "OUT/pixel_stats.json)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a pixel_stats.json with 'mean' and 'std' lists ({e})") from None
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"{path}: expected 3 means and 3 positive stds, got mean={mean} std={std}")
    if max(mean) <= 1.0 and max(std) <= 1.0:
        raise ValueError(f"{path}: statistics look 0-1 scaled (mean={mean}); usdet expects 0-255")
    return mean, std


def mixed_pixel_stats(cfg: CN) -> Tuple[List[float], List[float]]:
    """Mean/std (RGB, 0-255) of the training mix from one ``pixel_stats.json`` per training dataset.

    The mix is a mixture distribution: mean = sum w_i m_i, variance = sum w_i (s_i^2 + m_i^2) - mean^2,
    with w_i the sampling probability of source i (``DATASETS.TRAIN_WEIGHTS``, or each file's
    ``num_images`` share when the sources are simply concatenated). Images weigh equally, whatever
    their pixel count (the model sees them resized to similar sizes).
    """
    files = [f.strip() for f in str(cfg.INPUT.NORMALIZATION_FILE).split(",") if f.strip()]
    names = list(cfg.DATASETS.TRAIN)
    # One file for several sources would normalize the mix with one source's statistics: refused
    # (checked before reading, so the message is the same whether or not the files exist yet).
    if len(files) > 1 or len(names) > 1:
        if len(files) != len(names):
            raise ValueError(
                f"INPUT.NORMALIZATION_FILE names {len(files)} file{'s' * (len(files) != 1)} for {len(names)} "
                f"training datasets {names} ({files}): give one pixel_stats.json per DATASETS.TRAIN entry, "
                "comma-separated in the same order, so that the statistics of the mix can be computed (one file "
                "would normalize the whole mix with that one source's statistics)")
    stats = [read_pixel_stats(os.path.expanduser(f)) for f in files]
    if len(stats) == 1:
        return stats[0]
    weights = list(cfg.DATASETS.TRAIN_WEIGHTS)
    if not weights:
        weights = []
        for f in files:
            with open(os.path.expanduser(f), "r", encoding="utf-8") as fh:
                n = json.load(fh).get("num_images")
            if not isinstance(n, int) or n <= 0:
                raise ValueError(f"{f}: no positive 'num_images' to weight the concatenated sources by; "
                                 "set DATASETS.TRAIN_WEIGHTS")
            weights.append(n)
    if len(weights) != len(files) or min(weights) <= 0:
        raise ValueError(f"DATASETS.TRAIN_WEIGHTS {weights}: one positive weight per training dataset {names}")
    total = float(sum(weights))
    w = [float(x) / total for x in weights]
    mean = [sum(wi * m[c] for wi, (m, _) in zip(w, stats)) for c in range(3)]
    second = [sum(wi * (s[c] ** 2 + m[c] ** 2) for wi, (m, s) in zip(w, stats)) for c in range(3)]
    std = [max(second[c] - mean[c] ** 2, 0.0) ** 0.5 for c in range(3)]
    return mean, std


def resolve_normalization(cfg: CN) -> str:
    """Set ``MODEL.PIXEL_MEAN/STD`` from ``INPUT.NORMALIZATION`` (once) and return a log line.

    Idempotent: a config already resolved (``INPUT.NORMALIZATION_RESOLVED``) is left as is, so
    the stats are never applied twice and a saved ``config.yaml`` needs no stats file.
    """
    choice = str(cfg.INPUT.NORMALIZATION).lower()
    fmt = cfg.INPUT.FORMAT
    if choice not in NORMALIZATIONS:
        raise ValueError(f"INPUT.NORMALIZATION must be one of {NORMALIZATIONS}, got {cfg.INPUT.NORMALIZATION!r}")
    if not cfg.INPUT.NORMALIZATION_RESOLVED:
        was_frozen = cfg.is_frozen()
        cfg.defrost()
        if choice == "imagenet":
            cfg.MODEL.PIXEL_MEAN = _to_format(list(IMAGENET_MEAN_RGB), fmt)
            cfg.MODEL.PIXEL_STD = _to_format(list(IMAGENET_STD_RGB), fmt)
        elif choice == "dataset":
            if not cfg.INPUT.NORMALIZATION_FILE:
                raise ValueError("INPUT.NORMALIZATION 'dataset' needs INPUT.NORMALIZATION_FILE "
                                 "(the converter's OUT/pixel_stats.json)")
            mean, std = mixed_pixel_stats(cfg)
            cfg.MODEL.PIXEL_MEAN = [round(v, 4) for v in _to_format(mean, fmt)]
            cfg.MODEL.PIXEL_STD = [round(v, 4) for v in _to_format(std, fmt)]
        cfg.INPUT.NORMALIZATION_RESOLVED = True
        if was_frozen:
            cfg.freeze()
    source = {
        "imagenet": "ImageNet statistics",
        "dataset": f"training-split statistics from {cfg.INPUT.NORMALIZATION_FILE}"
                   + (f" weighted {list(cfg.DATASETS.TRAIN_WEIGHTS)}" if "," in str(cfg.INPUT.NORMALIZATION_FILE)
                      and len(cfg.DATASETS.TRAIN_WEIGHTS) else ""),
        "config": "MODEL.PIXEL_MEAN/STD as written in the config",
    }[choice]
    return (f"Input normalization '{choice}' ({source}), applied once by the model: "
            f"PIXEL_MEAN={list(cfg.MODEL.PIXEL_MEAN)} PIXEL_STD={list(cfg.MODEL.PIXEL_STD)} ({fmt} order, 0-255)")
