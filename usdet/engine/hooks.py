"""Training hooks: best-model checkpoint that survives ``--resume``, and a validation loss.

Both run only at their period; between evaluations their ``after_step`` is one modulo test,
so they cost nothing measurable per iteration.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import operator
import os
import zlib
from typing import Any, Dict, Iterable, List, Optional

import torch
from detectron2.engine.train_loop import HookBase
from detectron2.utils import comm

from usdet.engine.rng import preserve_rng
from usdet.utils.io import atomic_write_json, atomic_write_text

__all__ = ["BestModelHook", "EMAHook", "MissedEvaluationHook", "ValidationLossHook", "append_evaluation",
           "read_best_record", "read_evaluation_record", "read_evaluations"]

logger = logging.getLogger(__name__)

BEST_NAME = "model_best"
BEST_JSON = "best_metric.json"
EVALUATIONS = "evaluations.jsonl"


def read_evaluations(path: str) -> List[Dict[str, Any]]:
    """The records of an ``evaluations.jsonl`` (a run folder or the file), oldest first; [] when absent.

    A line that is not a JSON object with an ``iteration`` is skipped with a warning naming the
    file and line (the file is rewritten whole on every append, so this only happens to a file
    edited by hand).
    """
    if os.path.isdir(path):
        path = os.path.join(path, EVALUATIONS)
    records: List[Dict[str, Any]] = []
    try:
        fh = open(path, "r", encoding="utf-8")
    except FileNotFoundError:
        return records
    with fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                int(rec["iteration"])
            except (ValueError, KeyError, TypeError) as e:
                logger.warning("%s line %d: not an evaluation record (%s); skipped", path, n, e)
                continue
            records.append(rec)
    return records


def append_evaluation(output_dir: str, record: Dict[str, Any]) -> None:
    """Add one evaluation to ``OUTPUT_DIR/evaluations.jsonl`` (temp file + rename: never half-written).

    Records at or after ``record["iteration"]`` are dropped first: after a ``--resume`` from an
    earlier checkpoint they describe evaluations of a timeline that was rewound.
    """
    path = os.path.join(output_dir, EVALUATIONS)
    keep = [r for r in read_evaluations(path) if int(r["iteration"]) < int(record["iteration"])]
    lines = [json.dumps(r, sort_keys=True, allow_nan=False) for r in keep + [record]]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _finite_or_none(v: Any) -> Optional[float]:
    v = float(v)
    return v if math.isfinite(v) else None


def read_best_record(output_dir: str) -> Optional[Dict[str, Any]]:
    """The best-model record of a run folder, or None when it has no ``model_best.pth``.

    ``model_best.pth`` carries its own record (key ``usdet_best``), so the record always
    describes the file on disk, even if a kill fell between writing it and ``best_metric.json``.
    """
    pth = os.path.join(output_dir, BEST_NAME + ".pth")
    if not os.path.isfile(pth):
        return None
    try:
        data = torch.load(pth, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - report any unreadable file the same way
        logger.warning("Cannot read the best-model record from %s (%s); the best value restarts", pth, e)
        return None
    rec = data.get("usdet_best") if isinstance(data, dict) else None
    if not isinstance(rec, dict) or not {"metric", "value", "iteration"} <= set(rec):
        logger.warning("%s has no usdet best-model record; the best value restarts", pth)
        return None
    return {"metric": str(rec["metric"]), "value": float(rec["value"]), "iteration": int(rec["iteration"])}


class BestModelHook(HookBase):
    """Keep ``model_best.pth`` by one flattened eval metric; register it right after ``EvalHook``.

    Unlike detectron2's ``BestCheckpointer``: the best value is restored on ``--resume`` (from
    the record inside ``model_best.pth``), ``last_checkpoint`` is never re-pointed at the best
    model, the file holds weights only (no optimizer), and ``best_metric.json``
    (``{"metric", "value", "iteration"}``) is written atomically after every improvement.
    NaN results never count as an improvement.

    Every evaluation it sees also adds one line to ``evaluations.jsonl`` (:func:`append_evaluation`):
    ``{"iteration", "elapsed_s", "eval_end_s", "metrics"}``, where ``elapsed_s`` is the training
    time (``TimeBudgetHook``: evaluations before it included) when the evaluated weights were made,
    ``eval_end_s`` the time once this evaluation finished, and ``metrics`` the flattened
    evaluation results (NaN as null). A fresh run (no ``--resume``) starts the file anew.
    """

    def __init__(self, eval_period: int, checkpointer, metric: str, mode: str = "max", output_dir: str = "",
                 state_fn=None, elapsed_fn=None):
        if mode not in ("max", "min"):
            raise ValueError(f"SOLVER.BEST_CHECKPOINT.MODE must be 'max' or 'min', got {mode!r}")
        self._period = int(eval_period)
        self._checkpointer = checkpointer
        self.metric = metric
        self.mode = mode
        self._better = operator.gt if mode == "max" else operator.lt
        self._output_dir = output_dir or checkpointer.save_dir
        self._state_fn = state_fn  # the weights that were evaluated (EMA), default the model's
        self._elapsed_fn = elapsed_fn  # () -> (seconds when the weights were made, seconds now)
        self.best_value: Optional[float] = None
        self.best_iter: Optional[int] = None
        self._warned_missing = False

    def restore(self, resumed: bool) -> None:
        """Load the best-so-far of a resumed run; a fresh run (no ``--resume``) starts empty."""
        self.best_value = self.best_iter = None
        if not resumed:
            try:  # a new run in this folder: its evaluation log starts empty
                os.unlink(os.path.join(self._output_dir, EVALUATIONS))
            except FileNotFoundError:
                pass
            return
        rec = read_best_record(self._output_dir)
        if rec is None:
            return
        if rec["metric"] != self.metric:
            logger.warning("model_best.pth was chosen by %s, this run uses %s: the best value restarts and the "
                           "next evaluation replaces model_best.pth", rec["metric"], self.metric)
            return
        self.best_value, self.best_iter = rec["value"], rec["iteration"]
        logger.info("Resumed best-model record: %s = %.6g at iteration %d", self.metric, self.best_value,
                    self.best_iter)
        # Re-sync the JSON with the file on disk (a kill may have fallen between the two writes).
        atomic_write_json(os.path.join(self._output_dir, BEST_JSON), rec)

    def _record_evaluation(self, iteration: int, latest: Dict[str, Any]) -> None:
        """One ``evaluations.jsonl`` line: the evaluation scalars EvalHook stored at this iteration."""
        storage = self.trainer.storage
        hints = storage.smoothing_hints()
        metrics = {k: _finite_or_none(v) for k, (v, at) in sorted(latest.items())
                   if at == storage.iter and "/" in k and hints.get(k) is False}
        if not metrics:
            return
        made_s, now_s = self._elapsed_fn() if self._elapsed_fn else (None, None)
        append_evaluation(self._output_dir, {
            "iteration": int(iteration), "metrics": metrics,
            "elapsed_s": None if made_s is None else round(float(made_s), 3),
            "eval_end_s": None if now_s is None else round(float(now_s), 3)})

    def _check(self, iteration: int) -> None:
        latest = self.trainer.storage.latest()
        self._record_evaluation(iteration, latest)
        if self.metric not in latest:
            if not self._warned_missing:
                keys = sorted(k for k in latest if "/" in k)
                logger.warning("SOLVER.BEST_CHECKPOINT.METRIC %r was not produced by the evaluation; "
                               "model_best.pth is not kept. Available: %s", self.metric, keys)
                self._warned_missing = True
            return
        value, produced_at = latest[self.metric]
        if produced_at != self.trainer.storage.iter:
            return  # a stale value from an earlier evaluation: nothing new to compare
        value = float(value)
        if math.isnan(value) or math.isinf(value):
            logger.info("Best-model hook: %s is %s at iteration %d; not a candidate", self.metric, value, iteration)
            return
        if self.best_value is not None and not self._better(value, self.best_value):
            logger.info("Best-model hook: %s = %.6g at iteration %d, best stays %.6g (iteration %d)",
                        self.metric, value, iteration, self.best_value, self.best_iter)
            return
        record = {"metric": self.metric, "value": value, "iteration": int(iteration)}
        self._checkpointer.save_model_only(BEST_NAME, iteration=int(iteration), usdet_best=record,
                                           model_state=self._state_fn() if self._state_fn else None)
        atomic_write_json(os.path.join(self._output_dir, BEST_JSON), record)
        previous = "none" if self.best_value is None else f"{self.best_value:.6g} (iteration {self.best_iter})"
        logger.info("Saved model_best.pth: %s = %.6g at iteration %d (previous best %s)",
                    self.metric, value, iteration, previous)
        self.best_value, self.best_iter = value, int(iteration)

    def after_step(self) -> None:
        next_iter = self.trainer.iter + 1
        if self._period > 0 and next_iter % self._period == 0 and next_iter != self.trainer.max_iter:
            self._check(self.trainer.iter)

    def after_train(self) -> None:
        # EvalHook evaluates after the last iteration (trainer.iter == max_iter on success).
        if self.trainer.iter + 1 >= self.trainer.max_iter:
            self._check(min(self.trainer.iter, self.trainer.max_iter - 1))


def _bn_modules(model: torch.nn.Module) -> List[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training]


class ValidationLossHook(HookBase):
    """Every ``period`` iterations, the model's training losses on a held-out loader, without gradients.

    detectron2 models return losses only in training mode; that mode would also update
    BatchNorm running statistics with validation images, so BatchNorm layers are switched to
    eval mode for the pass (running stats used, not changed). Proposal sampling inside the
    model draws from torch's RNG: each image's pass is seeded by the image (so the mean over
    all images is the same in 1 or N processes), the training RNG state is restored afterwards,
    and successive values are comparable. Logs ``val_loss`` and ``val_<loss_name>``.
    """

    def __init__(self, period: int, data_loader_fn, seed: int = 0, before=None):
        self._period = int(period)
        self._data_loader_fn = data_loader_fn
        self._seed = int(seed)
        self._before = before  # e.g. the trainer's sync_buffers: rank 0's BN statistics everywhere

    def _losses(self, model: torch.nn.Module, data: Iterable) -> Dict[str, float]:
        sums: Dict[str, float] = {}
        count = 0
        with torch.no_grad():
            for batch in data:
                # Seeded by the batch's images, so a loss does not depend on which process or in
                # which order an image is seen (the val-loss loader has one image per batch).
                key = "|".join(str(d.get("image_id", d.get("file_name", ""))) for d in batch)
                torch.manual_seed(self._seed * 1000003 + zlib.crc32(key.encode()))
                loss_dict = model(batch)
                for k, v in loss_dict.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * len(batch)
                count += len(batch)
        return {"count": count, **sums}

    def _do(self) -> None:
        model = self.trainer.model
        was_training = model.training
        model.train()
        bns = _bn_modules(model)
        for m in bns:
            m.eval()
        if self._before is not None:
            self._before()
        try:
            with preserve_rng():
                part = self._losses(model, self._data_loader_fn())
        finally:
            for m in bns:
                m.train()
            model.train(was_training)
        parts = comm.gather(part, dst=0)
        if not comm.is_main_process():
            return
        count = sum(p["count"] for p in parts)
        if count == 0:
            logger.warning("Validation loss: the validation loader gave no images")
            return
        keys = [k for k in parts[0] if k != "count"]
        means = {f"val_{k}": sum(p.get(k, 0.0) for p in parts) / count for k in keys}
        means["val_loss"] = sum(means.values())
        self.trainer.storage.put_scalars(**means, smoothing_hint=False)
        logger.info("Validation loss at iteration %d over %d images: %s", self.trainer.iter, count,
                    ", ".join(f"{k}={v:.4f}" for k, v in sorted(means.items())))

    def after_step(self) -> None:
        next_iter = self.trainer.iter + 1
        if self._period > 0 and (next_iter % self._period == 0 or next_iter == self.trainer.max_iter):
            self._do()


class EMAHook(HookBase):
    """Exponential moving average of the weights, used for evaluation and for ``model_best.pth``.

    The average is torch's own ``torch.optim.swa_utils.AveragedModel`` (parameters and floating
    buffers such as BN statistics, ``use_buffers=True``) with an EMA ``multi_avg_fn`` whose decay
    warms up, ``d = min(decay, (1 + n) / (10 + n))`` after n updates, so early, random weights fade
    fast (torch's ``get_ema_multi_avg_fn`` has a fixed decay). Started from the weights present at
    ``before_train`` (so ``MODEL.WEIGHTS`` of a stage-2 run is its starting point). The average lives
    in the hook's state, hence in every periodic checkpoint (``{"ema": state dict, "updates",
    "decay"}``, keys unchanged), and ``--resume`` continues it.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        from torch.optim.swa_utils import AveragedModel

        if not 0.0 < decay < 1.0:
            raise ValueError(f"MODEL.EMA.DECAY must be in (0, 1), got {decay}")
        self._model = model.module if hasattr(model, "module") else model
        self.decay = float(decay)
        self._averaged = AveragedModel(self._model, multi_avg_fn=self._ema_step, use_buffers=True)
        self._loaded = False

    @torch.no_grad()
    def _ema_step(self, averaged: List[torch.Tensor], current: List[torch.Tensor], num_averaged) -> None:
        n = int(num_averaged)  # the update about to be made is the n-th (the start copy is number 0)
        d = min(self.decay, (1.0 + n) / (10.0 + n))
        if averaged and averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1.0 - d)
        else:  # integer buffers (BN's num_batches_tracked): the current value
            for a, c in zip(averaged, current):
                a.copy_(c)

    @property
    def updates(self) -> int:
        return max(int(self._averaged.n_averaged) - 1, 0)

    def before_train(self) -> None:
        if not self._loaded:
            self._averaged.n_averaged.zero_()
            self._averaged.update_parameters(self._model)  # the first "update" copies the start weights

    def after_step(self) -> None:
        self._averaged.update_parameters(self._model)

    def ema_state_dict(self) -> Dict[str, torch.Tensor]:
        """The averaged weights, as a model state dict (tensors shared with the average)."""
        return self._averaged.module.state_dict()

    @contextlib.contextmanager
    def averaged_weights(self):
        """Temporarily put the averaged weights into the model (e.g. to evaluate it)."""
        backup = {k: v.detach().clone() for k, v in self._model.state_dict().items()}
        self._model.load_state_dict(self.ema_state_dict())
        try:
            yield
        finally:
            self._model.load_state_dict(backup)

    def state_dict(self) -> Dict[str, Any]:
        return {"ema": self.ema_state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._averaged.module.load_state_dict(state["ema"])
        self._averaged.n_averaged.fill_(int(state["updates"]) + 1)
        self._loaded = True


def ema_weights(checkpoint: Any) -> Optional[Dict[str, torch.Tensor]]:
    """The averaged weights a training checkpoint carries, or None.

    The one place that knows where the EMA lives in a checkpoint (this hook's :meth:`EMAHook.state_dict`
    under the trainer's hook states, keyed by the hook's class name): ``--eval-only``, prediction and
    export all ask here.
    """
    if not isinstance(checkpoint, dict):
        return None
    state = ((checkpoint.get("trainer") or {}).get("hooks") or {}).get(EMAHook.__qualname__)
    return state.get("ema") if isinstance(state, dict) else None


EVAL_RECORD = "last_evaluation.json"


def read_evaluation_record(output_dir: str) -> int:
    """The iteration whose evaluation-time hooks last finished (``last_evaluation.json``), or -1."""
    path = os.path.join(output_dir, EVAL_RECORD)
    try:
        with open(path, "r", encoding="utf-8") as fh:
            return int(json.load(fh)["iteration"])
    except FileNotFoundError:
        return -1
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning("%s: unreadable (%s); treating the last evaluation as missing", path, e)
        return -1


class MissedEvaluationHook(HookBase):
    """The evaluation-time hooks of each iteration run exactly once, even across a kill.

    detectron2 runs the periodic checkpointer before the evaluation hooks, so a checkpoint at
    iteration k is written before the evaluation (validation loss, metrics, best-model
    candidacy) of k; a kill during that evaluation resumes at k + 1 and would skip it. The
    checkpoint records the iteration whose evaluation was still due (``usdet.pending_evaluation``,
    see ``Trainer.state_dict``), this hook writes ``last_evaluation.json`` once the evaluation-time
    hooks of an iteration have finished, and a resumed run whose checkpoint names a pending
    evaluation newer than that record runs it first, at storage iteration k, so its metrics and
    its best-model candidacy are exactly those of the uninterrupted run. Register it last.
    """

    def __init__(self, output_dir: str, actions: List[tuple]):
        """``actions``: ``(is_due(iteration) -> bool, run(iteration) -> None)`` in hook order."""
        self._output_dir = output_dir
        self._actions = actions
        self.missed: Optional[int] = None  # set by the trainer on resume

    def due(self, iteration: int) -> bool:
        return any(is_due(iteration) for is_due, _ in self._actions)

    def pending_since(self, pending: Optional[int]) -> Optional[int]:
        """``pending`` if the record shows its evaluation never finished (all ranks agree on rank 0's view)."""
        done = read_evaluation_record(self._output_dir) if comm.is_main_process() else -1
        done = comm.all_gather(done)[0]
        return pending if pending is not None and pending > done else None

    def _record(self, iteration: int) -> None:
        if comm.is_main_process():
            atomic_write_json(os.path.join(self._output_dir, EVAL_RECORD), {"iteration": int(iteration)})

    def before_train(self) -> None:
        k = self.missed
        if k is None:
            return
        self.missed = None
        logger.info("The evaluation of iteration %d was interrupted by the stop before this --resume: running it "
                    "now, before training continues", k)
        storage, saved = self.trainer.storage, (self.trainer.storage.iter, self.trainer.iter)
        storage.iter = self.trainer.iter = k
        try:
            for is_due, run in self._actions:
                if is_due(k):
                    run(k)
        finally:
            storage.iter, self.trainer.iter = saved
        self._record(k)

    def after_step(self) -> None:
        if self.due(self.trainer.iter):
            self._record(self.trainer.iter)

    def after_train(self) -> None:
        if self.trainer.iter + 1 >= self.trainer.max_iter:  # the final evaluation ran (after_train)
            self._record(self.trainer.max_iter - 1)
