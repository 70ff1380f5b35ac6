"""Run one job in a forked child beside the caller: two COCO evaluations of a large set at once.

A forked child inherits the loaded detections (nothing large is pickled; only the small result
comes back through a pipe). Where ``fork`` is missing, the machine has one CPU, or the child
fails, the job simply runs in the caller, so results never depend on this.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from typing import Any, Callable

logger = logging.getLogger(__name__)

__all__ = ["Beside", "can_fork"]


def can_fork() -> bool:
    """More than one CPU, the ``fork`` start method, and no CUDA context that a child would inherit."""
    if (os.cpu_count() or 1) < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return False
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_initialized():
            return False
    except Exception:  # noqa: BLE001 - an odd torch build: play safe
        return False
    return True


class Beside:
    """``Beside(fn, enabled).result()`` equals ``fn()``; with ``enabled`` it ran in a forked child."""

    def __init__(self, fn: Callable[[], Any], enabled: bool = True) -> None:
        self._fn = fn
        self._proc = None
        self._recv = None
        if enabled and can_fork():
            try:
                ctx = multiprocessing.get_context("fork")
                self._recv, send = ctx.Pipe(duplex=False)

                def target() -> None:
                    try:
                        send.send(("ok", fn()))
                    except BaseException as e:  # noqa: BLE001 - reported, the caller falls back
                        send.send(("error", repr(e)))
                    finally:
                        send.close()

                self._proc = ctx.Process(target=target, daemon=True)
                self._proc.start()
                send.close()
            except OSError as e:
                logger.warning("Could not fork a worker (%s); running the job in this process", e)
                self._proc = None

    @property
    def forked(self) -> bool:
        return self._proc is not None

    def result(self) -> Any:
        if self._proc is None:
            return self._fn()
        try:
            status, value = self._recv.recv()
        except EOFError:
            status, value = "error", f"worker exited with code {self._proc.exitcode}"
        finally:
            self._proc.join()
            self._recv.close()
            self._proc = None
        if status == "ok":
            return value
        logger.warning("Worker process failed (%s); running the job in this process", value)
        return self._fn()
