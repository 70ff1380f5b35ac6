"""usdet's ``Trainer``: detectron2's ``DefaultTrainer`` plus what a long ultrasound run needs.

What it adds, each by an override or a hook (no detectron2 internals are replaced):
- evaluation = COCO bbox AP + penalized IoU over the whole evaluation set;
- ``model_best.pth`` by any flattened metric, whose best value survives ``--resume``;
- honest resume: optimizer/grad-scaler state, RNG state and data position are checkpointed,
  so a resumed run continues as if never stopped, including an evaluation the stop
  interrupted (run first on resume); checkpoints are written atomically and
  ``last_checkpoint`` only names periodic ones;
- a NaN/Inf loss stops with a message naming the iteration, the last good checkpoint and the
  likely causes;
- an optional validation loss; usdet's mapper and augmentations; lesion-free images train;
- a wall-clock budget (``SOLVER.TIME_BUDGET_MIN``, usdet/engine/budget.py): the LR schedule runs
  on elapsed time and training stops at the budget; the elapsed time survives ``--resume``.
"""
from __future__ import annotations

import logging
import os
import weakref
from typing import Any, Dict, List, Optional

import torch.distributed as dist
import torch.utils.data as torchdata
from detectron2.data import MetadataCatalog, build_detection_test_loader, get_detection_dataset_dicts
from detectron2.data.build import build_detection_train_loader, trivial_batch_collator
from detectron2.data.common import DatasetFromList, MapDataset
from detectron2.data.samplers import InferenceSampler
from detectron2.engine import DefaultTrainer, hooks
from detectron2.evaluation import DatasetEvaluators, verify_results
from detectron2.modeling import GeneralizedRCNNWithTTA
from detectron2.utils import comm

from usdet.config import resolve_normalization
from usdet.data.loader import ResumableTrainLoader, build_resumable_train_loader
from usdet.data.mapper import UsdetDatasetMapper
from usdet.data.mixing import check_train_weights, load_training_sources
from usdet.engine.budget import BudgetSpent, StopAtBudgetHook, TimeBudgetHook, build_time_budget_scheduler
from usdet.engine.checkpoint import UsdetCheckpointer
from usdet.engine.launch import cpu_ddp
from usdet.engine.hooks import BestModelHook, EMAHook, MissedEvaluationHook, ValidationLossHook, ema_weights
from usdet.engine.rng import capture_rng, preserve_rng, reseed_all, restore_rng
from usdet.evaluation.evaluator import CleanCOCOEvaluator, PenalizedIoUEvaluator
from usdet.evaluation.report import evaluate_predictions
from usdet.utils.io import atomic_write_json

__all__ = ["EVALUATED_WEIGHTS", "Trainer", "TrainingDivergedError", "evaluate_checkpoint"]

logger = logging.getLogger(__name__)

#: ``OUTPUT_DIR/inference/<this>``: the weights ``evaluate_checkpoint`` evaluated, and their normalization
EVALUATED_WEIGHTS = "evaluated_weights.json"


class TrainingDivergedError(FloatingPointError):
    """The loss (or the predicted boxes) became NaN/Inf; the message says where and what to try."""


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with usdet's evaluation, checkpoints, resume and hooks (module docstring)."""

    def __init__(self, cfg):
        cfg = cfg.clone()
        if not cfg.INPUT.NORMALIZATION_RESOLVED:  # setup() already resolved (and logged) it
            logging.getLogger("usdet").info(resolve_normalization(cfg))
        self._best_hook: Optional[BestModelHook] = None
        self._missed_eval_hook: Optional[MissedEvaluationHook] = None
        self._pending_eval: Optional[int] = None
        self._step_gathered = False
        self._rng_per_rank: List[Dict[str, Any]] = []
        self._checkpoint_hook: Optional[hooks.PeriodicCheckpointer] = None
        if float(cfg.SOLVER.TIME_BUDGET_MIN) < 0:
            raise ValueError(f"SOLVER.TIME_BUDGET_MIN must be >= 0 minutes (0 = no budget), got "
                             f"{cfg.SOLVER.TIME_BUDGET_MIN}")
        me = weakref.ref(self)  # hooks hold no strong reference to the trainer (detectron2's rule)
        self.budget_hook = TimeBudgetHook(float(cfg.SOLVER.TIME_BUDGET_MIN) * 60.0,
                                          on_last_iteration=lambda k: me()._last_iteration_at(k))
        with cpu_ddp():  # detectron2 0.6 cannot wrap a CPU model in DDP (usdet.engine.launch)
            super().__init__(cfg)
        # Note when a step reached detectron2's metrics gather (all ranks meet there), for run_step.
        write_metrics = self._trainer._write_metrics

        def _write_metrics(*args, **kwargs):
            self._step_gathered = True
            return write_metrics(*args, **kwargs)

        self._trainer._write_metrics = _write_metrics

    # ------------------------------------------------------------------ builders
    @classmethod
    def build_train_loader(cls, cfg):
        """usdet's mapper; a resumable, seeded loader (``DATALOADER.SAMPLER_TRAIN TrainingSampler``)."""
        mapper = UsdetDatasetMapper(cfg, is_train=True)
        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
            if len(cfg.DATASETS.TRAIN_WEIGHTS):
                raise ValueError("DATASETS.TRAIN_WEIGHTS needs DATALOADER.SAMPLER_TRAIN TrainingSampler (usdet's "
                                 f"resumable sampler), not {cfg.DATALOADER.SAMPLER_TRAIN}")
            logger.warning("DATALOADER.SAMPLER_TRAIN %s: using detectron2's loader; after --resume the data "
                           "order is not the uninterrupted run's", cfg.DATALOADER.SAMPLER_TRAIN)
            mapper.set_pool(get_detection_dataset_dicts(list(cfg.DATASETS.TRAIN),
                                                        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS))
            return build_detection_train_loader(cfg, mapper=mapper)
        weights = check_train_weights(cfg.DATASETS.TRAIN, cfg.DATASETS.TRAIN_WEIGHTS)
        dataset, sources = load_training_sources(cfg.DATASETS.TRAIN, cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
        mapper.set_pool(dataset)  # mosaic partners and copy-paste donors
        seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
        return build_resumable_train_loader(
            dataset, mapper, total_batch_size=cfg.SOLVER.IMS_PER_BATCH, seed=seed,
            num_workers=cfg.DATALOADER.NUM_WORKERS, aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
            sources=sources, source_weights=weights)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=UsdetDatasetMapper(cfg, is_train=False))

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        """detectron2's schedule, or with ``SOLVER.TIME_BUDGET_MIN > 0`` the same shape on elapsed time."""
        if float(cfg.SOLVER.TIME_BUDGET_MIN) > 0:
            return build_time_budget_scheduler(cfg, optimizer)
        return super().build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """COCO bbox AP (pycocotools; this detectron2 has no compiled fast evaluator) + penalized IoU."""
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return DatasetEvaluators([
            CleanCOCOEvaluator(dataset_name, tasks=("bbox",), distributed=True, output_dir=output_folder,
                               use_fast_impl=False),
            PenalizedIoUEvaluator(dataset_name, cfg=cfg, output_dir=output_folder),
        ])

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
        dataset = MapDataset(DatasetFromList(dicts, copy=False), mapper)
        # One image per batch: each image's losses are then a function of the image and the
        # weights alone, whatever the number of processes (see ValidationLossHook).
        return torchdata.DataLoader(dataset, batch_size=1, sampler=InferenceSampler(len(dataset)),
                                    num_workers=cfg.DATALOADER.NUM_WORKERS, collate_fn=trivial_batch_collator)

    def build_hooks(self):
        cfg = self.cfg
        # DefaultTrainer made a plain DetectionCheckpointer just before calling us; replace it
        # before the PeriodicCheckpointer hook captures it. Every file it writes records the model's
        # normalization; a run trains with its config's, whatever the weights it starts from say.
        self.checkpointer = UsdetCheckpointer(self.model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self),
                                              num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES,
                                              normalization_from_checkpoint=False)
        ret = super().build_hooks()
        self._ema_hook = None
        if cfg.MODEL.EMA.ENABLED:
            # Updated right after the optimizer step, before the periodic checkpoint saves it.
            self._ema_hook = EMAHook(self.model, cfg.MODEL.EMA.DECAY)
            ckpt_pos = next((i for i, h in enumerate(ret) if isinstance(h, hooks.PeriodicCheckpointer)),
                            next(i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook)))
            ret.insert(ckpt_pos, self._ema_hook)
        self._checkpoint_hook = next((h for h in ret if isinstance(h, hooks.PeriodicCheckpointer)), None)
        # The wall clock first (it starts before anything else runs and sets each step's LR under a
        # time budget), so the missed evaluation of a --resume counts in the budget too.
        ret.insert(0, self.budget_hook)
        eval_pos = next(i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook))
        ret[eval_pos] = hooks.EvalHook(cfg.TEST.EVAL_PERIOD, self._evaluate)
        eval_period, val_period = cfg.TEST.EVAL_PERIOD, cfg.TEST.VAL_LOSS_PERIOD

        # self.max_iter, not the config's: a time budget can end the run earlier.
        def eval_due(k: int) -> bool:  # EvalHook.after_step's rule (the final one runs in after_train)
            return eval_period > 0 and (k + 1) % eval_period == 0 and k + 1 != self.max_iter

        # What runs at evaluation time, in hook order, for the missed-evaluation hook.
        actions: List[tuple] = []
        extra_before: List[Any] = []
        if val_period > 0 and len(cfg.DATASETS.TEST):
            loader = self.build_val_loss_loader(cfg)
            val_hook = ValidationLossHook(val_period, lambda: loader, seed=max(cfg.SEED, 0), before=self.sync_buffers)
            extra_before.append(val_hook)
            actions.append((lambda k: (k + 1) % val_period == 0 or k + 1 == self.max_iter, lambda k: val_hook._do()))
        actions.append((eval_due, lambda k: ret[eval_pos]._do_eval()))
        extra_after: List[Any] = []
        if cfg.SOLVER.BEST_CHECKPOINT.ENABLED and comm.is_main_process() and len(cfg.DATASETS.TEST):
            clock = self.budget_hook
            self._best_hook = BestModelHook(eval_period, self.checkpointer,
                                            cfg.SOLVER.BEST_CHECKPOINT.METRIC, cfg.SOLVER.BEST_CHECKPOINT.MODE,
                                            cfg.OUTPUT_DIR,
                                            state_fn=self._ema_hook.ema_state_dict if self._ema_hook else None,
                                            elapsed_fn=lambda: (clock.step_end_s, clock.elapsed()))
            extra_after.append(self._best_hook)
            actions.append((eval_due, self._best_hook._check))
        self._missed_eval_hook = MissedEvaluationHook(cfg.OUTPUT_DIR, actions)
        return (ret[:eval_pos] + extra_before + [ret[eval_pos]] + extra_after + ret[eval_pos + 1:]
                + [self._missed_eval_hook, StopAtBudgetHook(self.budget_hook)])

    def _last_iteration_at(self, k: int) -> None:
        """The time budget makes iteration ``k`` the last: detectron2's hooks then treat it as
        ``MAX_ITER - 1`` (model_final.pth, the final evaluation in after_train, the best-model check)."""
        self.max_iter = k + 1
        if self._checkpoint_hook is not None:
            self._checkpoint_hook.max_iter = k + 1

    def train(self):
        """detectron2's training loop; a spent time budget ends it like reaching ``MAX_ITER``."""
        try:
            return super().train()
        except BudgetSpent:
            logger.info("Training stopped by SOLVER.TIME_BUDGET_MIN after iteration %d (%.1f min of training)",
                        self.iter - 1, self.budget_hook.elapsed() / 60)
            if len(self.cfg.TEST.EXPECTED_RESULTS) and comm.is_main_process():  # as DefaultTrainer.train
                verify_results(self.cfg, self._last_eval_results)
                return self._last_eval_results
            return None

    def sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics) and averaged weights.

        DDP keeps the parameters equal, but usdet's BN is per process (SyncBN is CUDA-only and
        detectron2 wraps DDP with broadcast_buffers=False), so the running statistics drift
        apart; checkpoints hold rank 0's. Called before every evaluation and validation loss, so
        an evaluation in N processes is the evaluation of the saved checkpoint.
        """
        if comm.get_world_size() == 1:
            return
        model = self.model.module if hasattr(self.model, "module") else self.model
        tensors = list(model.buffers())
        if self._ema_hook is not None:
            tensors += list(self._ema_hook.ema_state_dict().values())
        for t in tensors:
            dist.broadcast(t, src=0)

    def _evaluate(self):
        """The periodic evaluation: of the averaged weights when MODEL.EMA is on."""
        self.sync_buffers()
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
        budget = self.budget_hook
        if resumed and budget.budget_s > 0:
            if not budget.restored:
                logger.warning("The checkpoint carries no elapsed training time (written before usdet measured it): "
                               "the %.1f-minute budget starts from 0 at iteration %d", budget.budget_s / 60,
                               self.start_iter)
            elif budget.spent():  # a run that ended at its budget: nothing left to train
                logger.info("The time budget was already spent (%.1f of %.1f min): no training, final evaluation only",
                            budget.elapsed() / 60, budget.budget_s / 60)
                self.max_iter = self.start_iter
        if self._best_hook is not None:
            self._best_hook.restore(resumed)
        if resumed and self._missed_eval_hook is not None:
            self._missed_eval_hook.missed = self._missed_eval_hook.pending_since(self._pending_eval)

    def state_dict(self) -> Dict[str, Any]:
        ret = super().state_dict()
        # detectron2 0.6 leaves the inner trainer out: the optimizer (momentum) and AMP scaler.
        ret["_trainer"] = self._trainer.state_dict()
        usdet: Dict[str, Any] = {"rng": capture_rng()}
        if self._rng_per_rank:  # every rank's streams (proposal sampling differs per rank)
            usdet["rng_per_rank"] = self._rng_per_rank
        loader = self._trainer.data_loader
        if isinstance(loader, ResumableTrainLoader):
            usdet["data_seed"] = loader.seed
        # What the data order depends on besides the seed: resuming with others changes it.
        usdet["world_size"] = comm.get_world_size()
        usdet["ims_per_batch"] = int(self.cfg.SOLVER.IMS_PER_BATCH)
        if self._missed_eval_hook is not None and self._missed_eval_hook.due(self.iter):
            # Saved before this iteration's evaluation (detectron2's hook order): due on resume
            # unless last_evaluation.json shows it finished.
            usdet["pending_evaluation"] = int(self.iter)
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
        self._pending_eval = extra.get("pending_evaluation")
        changed = layout_change_message(extra, comm.get_world_size(), int(self.cfg.SOLVER.IMS_PER_BATCH),
                                        int(state_dict.get("iteration", -1)) + 1)
        if changed:
            logger.warning(changed)
        loader = self._trainer.data_loader
        if "data_seed" in extra and isinstance(loader, ResumableTrainLoader):
            loader.set_seed(extra["data_seed"])
        per_rank = extra.get("rng_per_rank") or []
        if len(per_rank) == comm.get_world_size() > 1:
            restore_rng(per_rank[comm.get_rank()])
        elif "rng" in extra:
            if comm.get_rank() == 0:
                restore_rng(extra["rng"])
            else:  # another process count: other ranks get a fixed function of rank 0's state
                reseed_all(int(extra.get("data_seed", 0)) * 1000003 + comm.get_rank() * 7919 + int(self.iter))

    # ------------------------------------------------------------------ NaN guard
    def run_step(self) -> None:
        self._trainer.iter = self.iter
        self._step_gathered = False
        error: Optional[FloatingPointError] = None
        try:
            self._trainer.run_step()
        except FloatingPointError as e:
            if comm.get_world_size() == 1 or not self._step_gathered:
                # Single process, or raised in this rank's forward pass: stop now (on one machine
                # the launcher then stops the other processes).
                raise TrainingDivergedError(self._divergence_message(e)) from e
            error = e
        if comm.get_world_size() > 1:
            # detectron2 checks the gathered loss on rank 0 only; the other ranks would run on
            # into the next step's gradient all-reduce and wait there until the timeout.
            found = comm.all_gather(None if error is None else str(error))
            failed = [(rank, msg) for rank, msg in enumerate(found) if msg is not None]
            if failed:
                rank, msg = failed[0]
                err = error or FloatingPointError(f"{msg} (detected on rank {rank})")
                raise TrainingDivergedError(self._divergence_message(err)) from err
            # detectron2 checkpoints on rank 0 only: collect every rank's RNG state for it now
            # (no hook before the checkpointer draws random numbers).
            period = self.cfg.SOLVER.CHECKPOINT_PERIOD
            if (period > 0 and (self.iter + 1) % period == 0) or self.iter >= self.max_iter - 1:
                self._rng_per_rank = comm.all_gather(capture_rng())

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


def layout_change_message(saved: Dict[str, Any], world_size: int, ims_per_batch: int, start_iter: int) -> str:
    """What changes when a run is resumed with another process count or batch, or "" when nothing does."""
    w0, b0 = saved.get("world_size"), saved.get("ims_per_batch")
    if w0 is None or b0 is None or (int(w0), int(b0)) == (world_size, ims_per_batch):
        return ""
    msg = (f"Resuming at iteration {start_iter} a checkpoint written by {w0} process(es) with SOLVER.IMS_PER_BATCH "
           f"{b0}, now {world_size} process(es) with {ims_per_batch}: ")
    if int(b0) != ims_per_batch:
        return msg + (f"the data stream is now read {ims_per_batch} samples per iteration instead of {b0}, so from here "
                      "on samples are skipped or repeated relative to the uninterrupted run and the data order differs; "
                      "the LR schedule continues at the same iteration (SOLVER.BASE_LR is not rescaled), so the "
                      "effective learning rate per sample changes")
    return msg + (f"the same samples are drawn per iteration, but each process now takes every {world_size}-th of "
                  "them and groups them by aspect ratio itself, so batches differ in detail from the uninterrupted "
                  "run's (and BatchNorm sees other per-process batches); iteration, LR position and optimizer state "
                  "continue unchanged")


def evaluate_checkpoint(cfg, resume: bool = False) -> Dict[str, Any]:
    """``--eval-only``: load weights, evaluate ``DATASETS.TEST`` and write the full report per dataset.

    Weights: ``MODEL.WEIGHTS``, or with ``resume`` the run's ``last_checkpoint``, with the
    normalization the checkpoint records (``UsdetCheckpointer.for_inference``). The report
    (``usdet.evaluation.report.evaluate_predictions``: metrics.json, report.md, plots) goes to
    ``OUTPUT_DIR/inference/<dataset>/`` beside the COCO evaluator's ``coco_instances_results.json``;
    ``OUTPUT_DIR/inference/evaluated_weights.json`` says which weights and normalization were used.
    """
    model = Trainer.build_model(cfg)
    ckpt = UsdetCheckpointer.for_inference(model, cfg, save_dir=cfg.OUTPUT_DIR)
    weights = ckpt.get_checkpoint_file() if resume and ckpt.has_checkpoint() else cfg.MODEL.WEIGHTS
    if not weights:
        logger.warning("--eval-only with no MODEL.WEIGHTS (and nothing to --resume): evaluating random weights")
    extra = ckpt.resume_or_load(cfg.MODEL.WEIGHTS, resume=resume)
    ema = ema_weights(extra)
    used = "model"
    if cfg.MODEL.EMA.ENABLED and ema is not None:
        model.load_state_dict(ema)
        used = "ema"
        logger.info("Evaluating the EMA weights stored in %s", weights)
    results = Trainer.test(cfg, model)
    if comm.is_main_process():
        atomic_write_json(os.path.join(cfg.OUTPUT_DIR, "inference", EVALUATED_WEIGHTS),
                          {"weights": weights, "weights_used": used, "normalization": ckpt.normalization})
        write_reports(cfg, weights)
    return results


def write_reports(cfg, weights: str = "") -> List[str]:
    """Write the full evaluation report of each test dataset from the saved predictions."""
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
