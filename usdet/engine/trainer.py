"""usdet's ``Trainer``: detectron2's ``DefaultTrainer`` plus what a long ultrasound run needs.

What it adds, each by an override or a hook (no detectron2 internals are replaced):
- evaluation = COCO bbox AP + penalized IoU over the whole evaluation set;
- ``model_best.pth`` by any flattened metric, whose best value survives ``--resume``;
- honest resume: optimizer/grad-scaler state, RNG state and data position are checkpointed,
  so a resumed run continues as if never stopped; checkpoints are written atomically and
  ``last_checkpoint`` only names periodic ones;
- a NaN/Inf loss stops with a message naming the iteration, the last good checkpoint and the
  likely causes;
- an optional validation loss; usdet's mapper and augmentations; lesion-free images train.
"""
from __future__ import annotations

import logging
import os
import weakref
from typing import Any, Dict, List, Optional

import torch.utils.data as torchdata
from detectron2.data import MetadataCatalog, build_detection_test_loader, get_detection_dataset_dicts
from detectron2.data.build import build_detection_train_loader, trivial_batch_collator
from detectron2.data.common import DatasetFromList, MapDataset
from detectron2.data.samplers import InferenceSampler
from detectron2.engine import DefaultTrainer, hooks
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators
from detectron2.modeling import GeneralizedRCNNWithTTA
from detectron2.utils import comm

from usdet.config import resolve_normalization
from usdet.data.loader import ResumableTrainLoader, build_resumable_train_loader
from usdet.data.mapper import UsdetDatasetMapper
from usdet.engine.checkpoint import UsdetCheckpointer
from usdet.engine.hooks import BestModelHook, EMAHook, ValidationLossHook
from usdet.engine.rng import capture_rng, preserve_rng, reseed_all, restore_rng

__all__ = ["Trainer", "TrainingDivergedError", "evaluate_checkpoint"]

logger = logging.getLogger(__name__)


class TrainingDivergedError(FloatingPointError):
    """The loss (or the predicted boxes) became NaN/Inf; the message says where and what to try."""


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with usdet's evaluation, checkpoints, resume and hooks (module docstring)."""

    def __init__(self, cfg):
        cfg = cfg.clone()
        if not cfg.INPUT.NORMALIZATION_RESOLVED:  # setup() already resolved (and logged) it
            logging.getLogger("usdet").info(resolve_normalization(cfg))
        self._best_hook: Optional[BestModelHook] = None
        super().__init__(cfg)

    # ------------------------------------------------------------------ builders
    @classmethod
    def build_train_loader(cls, cfg):
        """usdet's mapper; a resumable, seeded loader (``DATALOADER.SAMPLER_TRAIN TrainingSampler``)."""
        mapper = UsdetDatasetMapper(cfg, is_train=True)
        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
            logger.warning("DATALOADER.SAMPLER_TRAIN %s: using detectron2's loader; after --resume the data "
                           "order is not the uninterrupted run's", cfg.DATALOADER.SAMPLER_TRAIN)
            return build_detection_train_loader(cfg, mapper=mapper)
        dataset = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
        seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
        return build_resumable_train_loader(
            dataset, mapper, total_batch_size=cfg.SOLVER.IMS_PER_BATCH, seed=seed,
            num_workers=cfg.DATALOADER.NUM_WORKERS, aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=UsdetDatasetMapper(cfg, is_train=False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """COCO bbox AP (pycocotools; this detectron2 has no compiled fast evaluator) + penalized IoU."""
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        evaluators = [COCOEvaluator(dataset_name, tasks=("bbox",), distributed=True, output_dir=output_folder,
                                    use_fast_impl=False)]
        try:
            from usdet.evaluation.penalized_iou import PenalizedIoUEvaluator
        except ImportError as e:  # pragma: no cover - only while the evaluator is missing
            logger.warning("Penalized IoU evaluator unavailable (%s); evaluating COCO AP only", e)
        else:
            evaluators.append(PenalizedIoUEvaluator(dataset_name, cfg=cfg, output_dir=output_folder))
        return DatasetEvaluators(evaluators)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """detectron2's evaluation loop (with test-time augmentation if configured), leaving the
        training RNG streams untouched."""
        if cfg.TEST.FLIP or cfg.TEST.AUG.ENABLED:
            model = GeneralizedRCNNWithTTA(tta_config(cfg), model)
        with preserve_rng():
            return super().test(cfg, model, evaluators)

    @classmethod
    def build_val_loss_loader(cls, cfg):
        """Batched loader over ``DATASETS.TEST`` with annotations and test-time resizing."""
        dicts = get_detection_dataset_dicts(list(cfg.DATASETS.TEST), filter_empty=False)
        mapper = UsdetDatasetMapper(cfg, is_train=False, keep_annotations=True)
        batch = max(1, cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size())
        dataset = MapDataset(DatasetFromList(dicts, copy=False), mapper)
        return torchdata.DataLoader(dataset, batch_size=batch, sampler=InferenceSampler(len(dataset)),
                                    num_workers=cfg.DATALOADER.NUM_WORKERS, collate_fn=trivial_batch_collator)

    def build_hooks(self):
        cfg = self.cfg
        # DefaultTrainer made a plain DetectionCheckpointer just before calling us; replace it
        # before the PeriodicCheckpointer hook captures it.
        self.checkpointer = UsdetCheckpointer(self.model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self),
                                              num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES)
        ret = super().build_hooks()
        self._ema_hook = None
        if cfg.MODEL.EMA.ENABLED:
            # Updated right after the optimizer step, before the periodic checkpoint saves it.
            self._ema_hook = EMAHook(self.model, cfg.MODEL.EMA.DECAY)
            ckpt_pos = next((i for i, h in enumerate(ret) if isinstance(h, hooks.PeriodicCheckpointer)),
                            next(i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook)))
            ret.insert(ckpt_pos, self._ema_hook)
        eval_pos = next(i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook))
        ret[eval_pos] = hooks.EvalHook(cfg.TEST.EVAL_PERIOD, self._evaluate)
        extra_before: List[Any] = []
        if cfg.TEST.VAL_LOSS_PERIOD > 0 and len(cfg.DATASETS.TEST):
            loader = self.build_val_loss_loader(cfg)
            extra_before.append(ValidationLossHook(cfg.TEST.VAL_LOSS_PERIOD, lambda: loader,
                                                   seed=max(cfg.SEED, 0)))
        extra_after: List[Any] = []
        if cfg.SOLVER.BEST_CHECKPOINT.ENABLED and comm.is_main_process() and len(cfg.DATASETS.TEST):
            self._best_hook = BestModelHook(cfg.TEST.EVAL_PERIOD, self.checkpointer,
                                            cfg.SOLVER.BEST_CHECKPOINT.METRIC, cfg.SOLVER.BEST_CHECKPOINT.MODE,
                                            cfg.OUTPUT_DIR,
                                            state_fn=self._ema_hook.ema_state_dict if self._ema_hook else None)
            extra_after.append(self._best_hook)
        return ret[:eval_pos] + extra_before + [ret[eval_pos]] + extra_after + ret[eval_pos + 1:]

    def _evaluate(self):
        """The periodic evaluation: of the averaged weights when MODEL.EMA is on."""
        if self._ema_hook is not None:
            with self._ema_hook.averaged_weights():
                self._last_eval_results = self.test(self.cfg, self.model)
        else:
            self._last_eval_results = self.test(self.cfg, self.model)
        return self._last_eval_results

    # ------------------------------------------------------------------ resume
    def resume_or_load(self, resume: bool = True) -> None:
        """Resume from ``last_checkpoint`` (a periodic checkpoint) or load ``MODEL.WEIGHTS`` at iteration 0."""
        resumed = resume and self.checkpointer.has_checkpoint()
        if resumed:
            logger.info("Resuming from %s", self.checkpointer.get_checkpoint_file())
        elif self.cfg.MODEL.WEIGHTS:
            logger.info("New run from weights %s: iteration 0, fresh optimizer and LR schedule",
                        self.cfg.MODEL.WEIGHTS)
        super().resume_or_load(resume=resume)
        loader = self._trainer.data_loader
        if isinstance(loader, ResumableTrainLoader):
            loader.set_start_iter(self.start_iter)
        if self._best_hook is not None:
            self._best_hook.restore(resumed)

    def state_dict(self) -> Dict[str, Any]:
        ret = super().state_dict()
        # detectron2 0.6 leaves the inner trainer out: the optimizer (momentum) and AMP scaler.
        ret["_trainer"] = self._trainer.state_dict()
        usdet: Dict[str, Any] = {"rng": capture_rng()}
        loader = self._trainer.data_loader
        if isinstance(loader, ResumableTrainLoader):
            usdet["data_seed"] = loader.seed
        ret["usdet"] = usdet
        return ret

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logger.warning("The checkpoint has no optimizer state (written by plain detectron2 0.6?): "
                           "momentum restarts from zero")
        extra = state_dict.get("usdet", {})
        loader = self._trainer.data_loader
        if "data_seed" in extra and isinstance(loader, ResumableTrainLoader):
            loader.set_seed(extra["data_seed"])
        if "rng" in extra:
            if comm.get_rank() == 0:
                restore_rng(extra["rng"])
            else:  # only rank 0's state is saved; other ranks get a fixed function of it
                reseed_all(int(extra.get("data_seed", 0)) * 1000003 + comm.get_rank() * 7919 + int(self.iter))

    # ------------------------------------------------------------------ NaN guard
    def run_step(self) -> None:
        self._trainer.iter = self.iter
        try:
            self._trainer.run_step()
        except FloatingPointError as e:
            raise TrainingDivergedError(self._divergence_message(e)) from e

    def _divergence_message(self, err: Exception) -> str:
        cfg = self.cfg
        if self.checkpointer.has_checkpoint():
            last = self.checkpointer.get_checkpoint_file()
            resume_hint = f"the last good checkpoint is {last}"
        else:
            last = None
            resume_hint = "no checkpoint was written yet in " + cfg.OUTPUT_DIR
        causes = [f"learning rate too high for this batch: SOLVER.BASE_LR {cfg.SOLVER.BASE_LR} with "
                  f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH}; lower it, lengthen SOLVER.WARMUP_ITERS "
                  f"({cfg.SOLVER.WARMUP_ITERS}) or enable SOLVER.CLIP_GRADIENTS"]
        norms = {cfg.MODEL.RESNETS.NORM, cfg.MODEL.FPN.NORM}
        scratch = not cfg.MODEL.WEIGHTS
        if "FrozenBN" in norms:
            causes.append("FrozenBN " + ("with random initial weights (MODEL.WEIGHTS is empty: THIS config) "
                                          if scratch else "") +
                          "cannot train from scratch; set MODEL.RESNETS.NORM and MODEL.FPN.NORM to BN or GN")
        if cfg.SOLVER.AMP.ENABLED:
            causes.append("fp16 overflow under SOLVER.AMP.ENABLED; try it off")
        causes.append("degenerate or out-of-image boxes in the training annotations")
        lines = [f"Training diverged at iteration {self.iter}: the loss or the predicted boxes became NaN/Inf "
                 f"({err}).", f"Stopped without saving; {resume_hint}."]
        if last:
            lines.append("After changing the config, continue with --resume, or start over without it.")
        lines.append("Likely causes:")
        lines += [f"  - {c}" for c in causes]
        return "\n".join(lines)


def evaluate_checkpoint(cfg, resume: bool = False) -> Dict[str, Any]:
    """``--eval-only``: load weights, evaluate ``DATASETS.TEST`` and write the full report per dataset.

    Weights: ``MODEL.WEIGHTS``, or with ``resume`` the run's ``last_checkpoint``. The report
    (``usdet.evaluation.report.evaluate_predictions``: metrics.json, report.md, plots) goes to
    ``OUTPUT_DIR/inference/<dataset>/`` beside the COCO evaluator's ``coco_instances_results.json``.
    """
    model = Trainer.build_model(cfg)
    ckpt = UsdetCheckpointer(model, save_dir=cfg.OUTPUT_DIR, num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    weights = ckpt.get_checkpoint_file() if resume and ckpt.has_checkpoint() else cfg.MODEL.WEIGHTS
    if not weights:
        logger.warning("--eval-only with no MODEL.WEIGHTS (and nothing to --resume): evaluating random weights")
    extra = ckpt.resume_or_load(cfg.MODEL.WEIGHTS, resume=resume)
    ema = (extra.get("trainer") or {}).get("hooks", {}).get("EMAHook") if isinstance(extra, dict) else None
    if cfg.MODEL.EMA.ENABLED and ema is not None:
        model.load_state_dict(ema["ema"])
        logger.info("Evaluating the EMA weights stored in %s", weights)
    results = Trainer.test(cfg, model)
    if comm.is_main_process():
        write_reports(cfg, weights)
    return results


def write_reports(cfg, weights: str = "") -> List[str]:
    """Write the full evaluation report of each test dataset from the saved predictions."""
    try:
        from usdet.evaluation.report import evaluate_predictions
    except ImportError as e:  # pragma: no cover - only while the report module is missing
        logger.warning("usdet.evaluation.report unavailable (%s); no report written", e)
        return []
    written = []
    for name in cfg.DATASETS.TEST:
        out = os.path.join(cfg.OUTPUT_DIR, "inference", name)
        preds = os.path.join(out, "coco_instances_results.json")
        gt = MetadataCatalog.get(name).get("json_file", None)
        if not gt or not os.path.isfile(preds):
            logger.warning("No report for %s: %s", name,
                           "the dataset has no json_file" if not gt else f"{preds} was not written")
            continue
        title = f"{weights or 'random weights'} on {name}"
        events = os.path.join(os.path.dirname(weights), "metrics.json") if weights else ""  # report.html's curves
        evaluate_predictions(gt, preds, out, title=title, training_metrics=events if os.path.isfile(events) else None,
                             **_report_options(cfg))
        logger.info("Evaluation report for %s written to %s", name, out)
        written.append(out)
    return written


def tta_config(cfg):
    """The config for detectron2's ``GeneralizedRCNNWithTTA``: ``TEST.FLIP`` alone means
    original + horizontal flip at the test size; ``TEST.AUG.*`` gives the full multi-scale set."""
    if cfg.TEST.AUG.ENABLED:
        return cfg
    tta = cfg.clone()
    tta.defrost()
    tta.TEST.AUG.MIN_SIZES = (cfg.INPUT.MIN_SIZE_TEST,)
    tta.TEST.AUG.MAX_SIZE = cfg.INPUT.MAX_SIZE_TEST
    tta.TEST.AUG.FLIP = True
    tta.freeze()
    return tta


def _report_options(cfg) -> Dict[str, Any]:
    return {
        "piou_score_thresh": float(cfg.TEST.PIOU.SCORE_THRESH),
        "piou_iou_thresh": float(cfg.TEST.PIOU.IOU_THRESH),
        "piou_topk": int(cfg.TEST.PIOU.TOPK),
        "piou_class_aware": bool(cfg.TEST.PIOU.CLASS_AWARE),
        "bootstrap": int(cfg.TEST.BOOTSTRAP),
        "seed": max(int(cfg.SEED), 0),
    }
