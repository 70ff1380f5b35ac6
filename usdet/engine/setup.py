"""``setup(args) -> cfg``: the one way usdet tools turn a YAML file plus overrides into a config."""
from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetCatalog
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

import usdet.modeling  # noqa: F401  (registers usdet's RPN and ROI heads, named by the configs)
from usdet.config import add_usdet_config, resolve_normalization
from usdet.utils.io import atomic_write_text

__all__ = ["build_config", "setup", "check_datasets", "default_run_setup"]


def build_config(config_file: str = "", opts: Sequence[str] = (), resolve: bool = True) -> CfgNode:
    """detectron2 defaults + usdet keys, then the file, then ``KEY VALUE`` overrides; normalization resolved.

    An unknown key or a bad value raises ``ValueError`` naming the file (or the overrides).
    ``resolve=False`` leaves ``MODEL.PIXEL_MEAN/STD`` unresolved, for callers that only read the schedule
    or the datasets and must work before the converter has written ``pixel_stats.json``.
    """
    cfg = get_cfg()
    add_usdet_config(cfg)
    if config_file:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"{config_file}: config file not found")
        try:
            cfg.merge_from_file(config_file)
        except (KeyError, ValueError, TypeError, AssertionError) as e:
            raise ValueError(f"{config_file}: {e}") from None
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, ValueError, TypeError, AssertionError) as e:
        raise ValueError(f"command-line overrides {list(opts)}: {e}") from None
    if resolve:
        resolve_normalization(cfg)
    if str(cfg.MODEL.DEVICE).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            logging.getLogger("usdet").warning("MODEL.DEVICE %s but CUDA is not available: using cpu",
                                               cfg.MODEL.DEVICE)
            cfg.MODEL.DEVICE = "cpu"
    return cfg


def check_datasets(cfg: CfgNode, eval_only: bool = False) -> None:
    """Fail early, with the fix, when a dataset named by the config is not registered."""
    names = ([] if eval_only else list(cfg.DATASETS.TRAIN)) + list(cfg.DATASETS.TEST)
    known = set(DatasetCatalog.list())
    missing = [n for n in names if n not in known]
    if missing:
        usdet_like = sorted(n for n in known if not n.startswith(("coco_", "lvis_", "voc_", "cityscapes_",
                                                                  "keypoints_", "ade20k_")))
        raise KeyError(
            f"dataset(s) {missing} are not registered. usdet registers <dataset>_<split> for every "
            f"$USDET_DATASETS/<dataset>/annotations/<split>.json (USDET_DATASETS="
            f"{os.environ.get('USDET_DATASETS', 'datasets')}); convert the data first or fix DATASETS.TRAIN/TEST. "
            f"Registered usdet-style names: {usdet_like}")
    from detectron2.data import MetadataCatalog

    num_classes = int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    train = [] if eval_only else list(cfg.DATASETS.TRAIN)
    if len(train) > 1:  # several sources: classes reconciled by name onto the first one's
        from usdet.data.mixing import check_train_weights, reconcile_classes

        check_train_weights(train, cfg.DATASETS.TRAIN_WEIGHTS)
        reconcile_classes({n: MetadataCatalog.get(n).get("thing_classes", []) for n in train}, train)
        names = [train[0]] + [n for n in names if n not in train]
    elif len(cfg.DATASETS.TRAIN_WEIGHTS) and not eval_only:
        check_train_weights(train, cfg.DATASETS.TRAIN_WEIGHTS)
    # Class ids are positions in thing_classes: a test set with the model's names in another order
    # would score benign boxes as malignant (class-aware AP permuted), so names are compared in order.
    # The model's classes are the (first) training dataset's; for --eval-only, the config's training
    # dataset where it is registered, else the first test dataset.
    ref_name = train[0] if train else next((n for n in cfg.DATASETS.TRAIN if n in known), None)
    ref = MetadataCatalog.get(ref_name).get("thing_classes", None) if ref_name else None
    for name in names:
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes is None:
            continue
        if len(classes) != num_classes:
            raise ValueError(
                f"dataset {name} has {len(classes)} class(es) {list(classes)} but MODEL.ROI_HEADS.NUM_CLASSES is "
                f"{num_classes}: set MODEL.ROI_HEADS.NUM_CLASSES {len(classes)}")
        if ref is None:
            ref_name, ref = name, classes
        elif list(classes) != list(ref):
            raise ValueError(
                f"dataset {name} has classes {list(classes)} but {ref_name} (whose class order the model uses) has "
                f"{list(ref)}: class ids are positions in that list, so evaluating on {name} would "
                + ("swap its classes" if sorted(classes) == sorted(ref) else "score its classes as others")
                + f". Convert {name} with the same --classes, or evaluate it with a model of its own classes")


def _environment_info() -> str:
    from detectron2.utils.collect_env import collect_env_info

    try:
        return collect_env_info()
    except ImportError as e:  # this detectron2 has no compiled _C; collect_env asks it for versions
        import torch

        return f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()} ({e})"


def default_run_setup(cfg: CfgNode, args=None, *, eval_only: Optional[bool] = None) -> None:
    """What detectron2's ``default_setup`` does (loggers, environment and config in the log,
    ``OUTPUT_DIR/config.yaml``, seeding, cudnn), tolerant of a detectron2 without compiled ops.
    An evaluation (``eval_only``, default ``args.eval_only``) writes ``config_eval.yaml`` instead,
    keeping the training run's record. ``args``: the tool's command line, logged when given."""
    if eval_only is None:
        eval_only = bool(getattr(args, "eval_only", False))
    output_dir = cfg.OUTPUT_DIR
    rank = comm.get_rank()
    if comm.is_main_process() and output_dir:
        os.makedirs(output_dir, exist_ok=True)
    setup_logger(output_dir, distributed_rank=rank, name="fvcore")
    setup_logger(output_dir, distributed_rank=rank, name="usdet")
    logger = setup_logger(output_dir, distributed_rank=rank)
    logger.info("Rank of current process: %d. World size: %d", rank, comm.get_world_size())
    logger.info("Environment info:\n%s", _environment_info())
    if args is not None:
        logger.info("Command line arguments: %s", args)
    if comm.is_main_process() and output_dir:
        # --eval-only into a training folder must not replace the training run's config.yaml.
        path = os.path.join(output_dir, "config_eval.yaml" if eval_only else "config.yaml")
        logger.info("Running with full config:\n%s", cfg.dump())
        atomic_write_text(path, cfg.dump())
        logger.info("Full config saved to %s", path)
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + rank)
    if not eval_only:
        import torch

        torch.backends.cudnn.benchmark = bool(cfg.CUDNN_BENCHMARK)


def setup(args) -> CfgNode:
    """Config from ``args.config_file`` + ``args.opts``, frozen; logging, seeding and config.yaml written."""
    cfg = build_config(args.config_file, args.opts)
    message = resolve_normalization(cfg)  # already resolved: returns the log line only
    cfg.freeze()
    default_run_setup(cfg, args)
    logging.getLogger("usdet").info(message)
    return cfg
