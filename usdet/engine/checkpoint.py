"""Checkpoints that survive a kill, and a ``last_checkpoint`` that only ever names periodic ones.

detectron2's checkpointer writes the ``.pth`` in place (a kill mid-save leaves a truncated file)
and re-points ``last_checkpoint`` at whatever it saved, so saving ``model_best`` would make
``--resume`` restart from the best model's older iteration. Here every file is written to a
temporary name, fsynced and renamed, and best-model saves never touch ``last_checkpoint``.
"""
from __future__ import annotations

import glob
import logging
import os
import re
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn
from detectron2.checkpoint import DetectionCheckpointer

from usdet.utils.io import atomic_write, atomic_write_text

__all__ = ["UsdetCheckpointer", "head_mismatch_message", "set_pixel_normalization"]

logger = logging.getLogger(__name__)

_PREDICTOR_KEY = re.compile(r"(^|\.)(box_predictor|mask_head\.predictor|keypoint_head\.score_lowres)\.")


def head_mismatch_message(incorrect_shapes: List[tuple], num_classes: int) -> str:
    """One explicit line about the layers left at random init because their shapes differ."""
    names = ", ".join(f"{k} {tuple(ckpt)}->{tuple(model)}" for k, ckpt, model in incorrect_shapes)
    if all(_PREDICTOR_KEY.search(k) for k, _, _ in incorrect_shapes):
        return (f"Loaded weights for a different class count: {len(incorrect_shapes)} class-dependent head "
                f"parameters re-initialized randomly (this model has {num_classes} class(es)): {names}. "
                "All other weights were loaded.")
    return (f"Loaded weights from a different architecture: {len(incorrect_shapes)} parameters with other shapes "
            f"were re-initialized randomly: {names}. Check that the config matches the one the weights came from.")


class UsdetCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with atomic saves and a ``tag_last`` switch.

    ``save(name, tag_last=True)`` writes ``name.pth`` (temp file + fsync + rename) and then,
    for periodic checkpoints only, rewrites ``last_checkpoint`` the same way. A kill at any
    moment leaves ``last_checkpoint`` naming a complete file. ``save_model_only`` writes the
    weights plus extra data without trainer state (``model_best.pth``) and never re-tags.
    """

    def __init__(self, model, save_dir: str = "", *, num_classes: int = 0, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.num_classes = int(num_classes)
        if self.save_dir and self.save_to_disk and os.path.isdir(self.save_dir):
            # Leftovers of a save that was killed before its rename: never valid, safe to drop.
            for tmp in glob.glob(os.path.join(self.save_dir, ".*.pth.*.tmp")):
                try:
                    os.unlink(tmp)
                    logger.info("Removed the temporary file of an interrupted save: %s", tmp)
                except OSError:
                    pass

    def _write(self, basename: str, data: Dict[str, Any]) -> str:
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to {}".format(save_file))
        atomic_write(save_file, lambda fh: torch.save(data, fh), "wb")
        return save_file

    def save(self, name: str, *, tag_last: bool = True, **kwargs: Any) -> None:  # type: ignore[override]
        if not self.save_dir or not self.save_to_disk:
            return
        data: Dict[str, Any] = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        self._write(basename, data)
        if tag_last:
            self.tag_last_checkpoint(basename)

    def save_model_only(self, name: str, model_state: Optional[Dict[str, Any]] = None, **kwargs: Any) -> str:
        """Write ``name.pth`` with weights (the model's, or ``model_state``) and ``kwargs`` only.

        ``last_checkpoint`` is left untouched.
        """
        if not self.save_dir or not self.save_to_disk:
            return ""
        data: Dict[str, Any] = {"model": self.model.state_dict() if model_state is None else model_state}
        data.update(kwargs)
        return self._write(f"{name}.pth", data)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)

    def get_checkpoint_file(self) -> str:
        path = super().get_checkpoint_file()
        if path and not os.path.isfile(path):
            raise FileNotFoundError(
                f"{os.path.join(self.save_dir, 'last_checkpoint')} names {os.path.basename(path)}, which does not "
                "exist: restore it, or start a new run without --resume")
        return path

    def _load_file(self, f: str) -> Dict[str, Any]:
        if f.endswith(".pkl"):  # detectron2 / Caffe2 model-zoo weights: detectron2's own reader
            return super()._load_file(f)
        try:
            return super()._load_file(f)
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
            raise RuntimeError(f"{f}: not a readable checkpoint ({type(e).__name__}: {e})") from e

    def _load_model(self, checkpoint: Dict[str, Any]):
        """detectron2's loading, then a site adaptation's pixel normalization (``tools/adapt_site.py``).

        ``pixel_mean``/``pixel_std`` are not part of a detectron2 state dict (the config sets them),
        so a checkpoint adapted to a site's pixel statistics carries them in ``usdet_adaptation``
        and every tool that loads weights through here uses them, whatever the config says.
        """
        incompatible = super()._load_model(checkpoint)
        record = checkpoint.get("usdet_adaptation") if isinstance(checkpoint, dict) else None
        if isinstance(record, dict):
            model = getattr(self.model, "module", self.model)
            if record.get("pixel_mean") is not None and hasattr(model, "pixel_mean"):
                set_pixel_normalization(model, record["pixel_mean"], record["pixel_std"])
                self.logger.warning("Site-adapted checkpoint: its PIXEL_MEAN %s / PIXEL_STD %s replace the config's",
                                    record["pixel_mean"], record["pixel_std"])
            self.logger.info("Weights adapted to a site without labels (%s on %s frame(s)); verdict: %s",
                             record.get("method"), record.get("num_images"), record.get("verdict"))
        return incompatible

    def _log_incompatible_keys(self, incompatible) -> None:
        super()._log_incompatible_keys(incompatible)
        if incompatible.incorrect_shapes:
            self.logger.warning(head_mismatch_message(incompatible.incorrect_shapes, self.num_classes))


def set_pixel_normalization(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
    """Replace a detectron2 meta-architecture's ``pixel_mean``/``pixel_std`` buffers in place."""
    for name, values in (("pixel_mean", mean), ("pixel_std", std)):
        buf = getattr(model, name, None)
        if not isinstance(buf, torch.Tensor) or buf.numel() != len(values):
            raise ValueError(f"the model has no {len(values)}-channel {name} buffer to adapt")
        buf.copy_(torch.as_tensor([float(v) for v in values], dtype=buf.dtype).view_as(buf))
