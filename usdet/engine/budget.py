"""A wall-clock training budget (``SOLVER.TIME_BUDGET_MIN``): the LR schedule runs on elapsed time.

Why: a schedule fitted in iterations from a speed probe ends wherever the machine's real speed puts
it; a budget in minutes is what a fair comparison fixes (Ultralytics' ``time=`` anneals its learning
rate by elapsed time and stops at the budget). With ``SOLVER.TIME_BUDGET_MIN > 0``:

- :class:`TimeBudgetLR` (detectron2's ``LRMultiplier``) evaluates the config's schedule shape
  (detectron2's own, ``WarmupCosineLR`` or ``WarmupMultiStepLR`` with ``STEPS`` read as fractions
  ``STEPS / MAX_ITER``) at *elapsed / budget* instead of *iteration / MAX_ITER*; the warmup stays
  in iterations (``WARMUP_ITERS``, ``WARMUP_FACTOR``, ``WARMUP_METHOD``, as Ultralytics' warmup),
  multiplying the shape.
- :class:`TimeBudgetHook` (registered first) measures training time: the training loop from
  ``before_train`` on, its periodic evaluations, validation losses and checkpoints included (how
  the peer's ``time`` counts), not the process start-up before it nor the final evaluation after
  it. Rank 0's clock is broadcast to every rank before each step, so all ranks use one learning
  rate and agree on the last iteration. The first step that starts with the budget spent is the
  last: it gets the final checkpoint (``model_final.pth``) and the final evaluation (which the
  best-model hook sees), as if ``MAX_ITER`` had been reached. ``MAX_ITER`` stays an upper bound.
- The elapsed seconds live in the hook's state, i.e. in every checkpoint
  (``trainer.hooks.TimeBudgetHook.elapsed_s``), so ``--resume`` continues the clock.
- :class:`StopAtBudgetHook` (registered last) ends detectron2's loop after that iteration's hooks.

Without a budget the hook still measures the elapsed time (for ``evaluations.jsonl``), with no
collective and no effect on the schedule.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from detectron2.engine.train_loop import HookBase
from detectron2.solver import LRMultiplier, build_lr_scheduler
from detectron2.utils import comm
from fvcore.common.param_scheduler import ParamScheduler

__all__ = ["BudgetSpent", "StopAtBudgetHook", "TimeBudgetHook", "TimeBudgetLR", "broadcast_from_main",
           "build_time_budget_scheduler"]

logger = logging.getLogger(__name__)


class BudgetSpent(BaseException):
    """Ends detectron2's training loop after the last iteration of a time budget.

    A ``BaseException``, not an ``Exception``: detectron2's ``TrainerBase.train`` logs every
    ``Exception`` as a failure; this one passes through its ``finally: after_train()`` (final
    checkpoint already written, final evaluation and best-model check run there) and is caught by
    ``usdet.engine.Trainer.train``.
    """


class TimeBudgetLR(LRMultiplier):
    """detectron2's ``LRMultiplier`` positioned by the elapsed fraction of a wall-clock budget.

    multiplier = warmup(iteration) * shape(min(elapsed_s / budget_s, 1)); ``elapsed_s`` is set by
    :class:`TimeBudgetHook` before every step (the same value on every rank). The torch state
    (``last_epoch`` = iteration, ``base_lrs``) is detectron2's, so ``--resume`` restores it as usual.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, shape: ParamScheduler, budget_s: float,
                 warmup_iters: int = 0, warmup_factor: float = 0.001, warmup_method: str = "linear",
                 last_iter: int = -1):
        if budget_s <= 0:
            raise ValueError(f"TimeBudgetLR needs a positive budget, got {budget_s} s")
        if warmup_method not in ("linear", "constant"):
            raise ValueError(f"Unknown warmup method: {warmup_method}")
        self.budget_s = float(budget_s)
        self.elapsed_s = 0.0
        self.warmup_iters = int(warmup_iters)
        self.warmup_factor = float(warmup_factor)
        self.warmup_method = warmup_method
        super().__init__(optimizer, multiplier=shape, max_iter=1, last_iter=last_iter)

    def fraction(self) -> float:
        """The schedule position: the elapsed fraction of the budget, in [0, 1]."""
        return min(max(self.elapsed_s / self.budget_s, 0.0), 1.0)

    def warmup(self, iteration: int) -> float:
        """detectron2's warmup factor at ``iteration`` (1 once ``WARMUP_ITERS`` are done)."""
        if iteration >= self.warmup_iters:
            return 1.0
        if self.warmup_method == "constant":
            return self.warmup_factor
        alpha = iteration / self.warmup_iters
        return self.warmup_factor * (1.0 - alpha) + alpha

    def multiplier(self, iteration: int, elapsed_s: float) -> float:
        """The LR multiplier at ``iteration`` after ``elapsed_s`` seconds (no state changed)."""
        return self.warmup(iteration) * self._multiplier(min(max(elapsed_s / self.budget_s, 0.0), 1.0))

    def get_lr(self) -> List[float]:
        m = self.multiplier(self.last_epoch, self.elapsed_s)
        return [base_lr * m for base_lr in self.base_lrs]

    def apply(self) -> None:
        """Set the optimizer's LRs for the current iteration from the current ``elapsed_s``."""
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = lrs


def build_time_budget_scheduler(cfg, optimizer: torch.optim.Optimizer) -> TimeBudgetLR:
    """The config's schedule shape (detectron2's ``build_lr_scheduler`` without its warmup) on a time budget."""
    budget_min = float(cfg.SOLVER.TIME_BUDGET_MIN)
    if budget_min <= 0:
        raise ValueError(f"SOLVER.TIME_BUDGET_MIN must be > 0 for a time-budget schedule, got {budget_min}")
    shape_cfg = cfg.clone()
    shape_cfg.defrost()
    shape_cfg.SOLVER.WARMUP_ITERS = 0  # warmup stays in iterations: TimeBudgetLR.warmup
    shape = build_lr_scheduler(shape_cfg, optimizer)._multiplier
    return TimeBudgetLR(optimizer, shape, budget_min * 60.0, warmup_iters=int(cfg.SOLVER.WARMUP_ITERS),
                        warmup_factor=float(cfg.SOLVER.WARMUP_FACTOR), warmup_method=cfg.SOLVER.WARMUP_METHOD)


def broadcast_from_main(value: float) -> float:
    """Rank 0's ``value`` on every rank (one float64 broadcast; a no-op in one process)."""
    if comm.get_world_size() == 1:
        return float(value)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())


class TimeBudgetHook(HookBase):
    """Training wall clock, resumable; with ``budget_s > 0`` it drives :class:`TimeBudgetLR` and the stop.

    ``clock`` (default ``time.monotonic``) is injectable so tests can run a fake clock.
    ``on_last_iteration(k)`` is called on every rank when iteration ``k`` is found to be the last
    (the trainer shortens its ``max_iter`` and its checkpointer's to ``k + 1`` there).
    """

    def __init__(self, budget_s: float = 0.0, clock: Callable[[], float] = time.monotonic,
                 on_last_iteration: Optional[Callable[[int], None]] = None):
        self.budget_s = max(float(budget_s), 0.0)
        self.clock = clock  # public: tests swap in a fake clock
        self._on_last = on_last_iteration
        self._offset = 0.0  # seconds elapsed before this process (restored on --resume)
        self._start: Optional[float] = None
        self.restored = False  # a checkpoint's elapsed time was loaded (--resume)
        self.restored_budget_s: Optional[float] = None
        self.elapsed_s = 0.0  # rank 0's elapsed time at the start of the current step, on every rank
        self.step_end_s = 0.0  # elapsed time when the latest training step finished (the weights' time)
        self.last_iter: Optional[int] = None  # set when the budget ends the run
        self._spent_at_start = False

    def elapsed(self) -> float:
        """Seconds of training so far (this process's clock, plus what a resumed checkpoint carried)."""
        if self._start is None:
            return self._offset
        return self._offset + self.clock() - self._start

    def spent(self) -> bool:
        return self.budget_s > 0 and self.elapsed() >= self.budget_s

    def before_train(self) -> None:
        self._start = self.clock()
        self.elapsed_s = self.step_end_s = self._offset
        self._spent_at_start = self.budget_s > 0 and self._offset >= self.budget_s  # a finished run resumed
        if self.budget_s > 0:
            logger.info("Time budget %.1f min (SOLVER.TIME_BUDGET_MIN): %.1f min used so far; the LR schedule "
                        "follows the elapsed fraction, SOLVER.MAX_ITER %d is an upper bound",
                        self.budget_s / 60, self._offset / 60, self.trainer.max_iter)

    def before_step(self) -> None:
        if self.budget_s <= 0:
            return
        self.elapsed_s = broadcast_from_main(self.elapsed())
        sched = getattr(self.trainer, "scheduler", None)
        if isinstance(sched, TimeBudgetLR):
            sched.elapsed_s = self.elapsed_s
            sched.apply()
        k = int(self.trainer.iter)
        if self.last_iter is None and self.elapsed_s >= self.budget_s:
            self.last_iter = k
            logger.info("Time budget of %.1f min spent (%.1f min elapsed) at iteration %d: it is the last one "
                        "(final checkpoint and evaluation follow)", self.budget_s / 60, self.elapsed_s / 60, k)
            if self._on_last is not None:
                self._on_last(k)

    def after_step(self) -> None:
        self.step_end_s = self.elapsed()

    def after_train(self) -> None:
        if (self.budget_s > 0 and self.last_iter is None and not self._spent_at_start
                and self.trainer.iter >= self.trainer.max_iter):
            logger.warning("SOLVER.MAX_ITER %d reached after %.1f of %.1f budget minutes: the LR schedule stopped "
                           "at %.0f%% of its course; raise SOLVER.MAX_ITER to use the whole budget",
                           self.trainer.max_iter, self.elapsed() / 60, self.budget_s / 60,
                           100 * min(self.elapsed() / self.budget_s, 1.0))

    def state_dict(self) -> Dict[str, Any]:
        return {"elapsed_s": float(self.elapsed()), "budget_s": float(self.budget_s)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._offset = float(state["elapsed_s"])
        self.restored = True
        self.restored_budget_s = float(state.get("budget_s", 0.0))
        if self.budget_s > 0 and self.restored_budget_s not in (0.0, self.budget_s):
            logger.warning("Resuming a run written with a %.1f-minute budget under %.1f minutes: the schedule "
                           "position jumps to %.1f / %.1f", self.restored_budget_s / 60, self.budget_s / 60,
                           self._offset / 60, self.budget_s / 60)


class StopAtBudgetHook(HookBase):
    """Registered last: after the last iteration's hooks (checkpoint included), end the loop."""

    def __init__(self, budget: TimeBudgetHook):
        self._budget = budget

    def after_step(self) -> None:
        last = self._budget.last_iter
        if last is not None and self.trainer.iter >= last:
            # What detectron2's loop leaves after its last iteration (iter == max_iter), so after_train
            # (final evaluation, logged at that iteration as usual) sees a completed run.
            self.trainer.iter = last + 1
            raise BudgetSpent(f"time budget spent at iteration {last}")
