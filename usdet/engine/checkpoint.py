"""Checkpoints that survive a kill, name only periodic ones as last, and carry their normalization.

detectron2's checkpointer writes the ``.pth`` in place (a kill mid-save leaves a truncated file)
and re-points ``last_checkpoint`` at whatever it saved, so saving ``model_best`` would make
``--resume`` restart from the best model's older iteration. Here every file is written to a
temporary name, fsynced and renamed, and best-model saves never touch ``last_checkpoint``.

detectron2 keeps ``pixel_mean``/``pixel_std`` out of the state dict (the config sets them), so
weights trained with one normalization would be run under whatever config loads them (a
``mixed`` model evaluated with BUSI's statistics). Every file written here records the model's
normalization under ``usdet_normalization``; loading for inference applies it (one warning line
when the config says otherwise), unless ``INPUT.NORMALIZATION_FROM_CHECKPOINT`` is False.
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
from detectron2.config import CfgNode

from usdet.utils.io import atomic_write, atomic_write_text

__all__ = ["NORMALIZATION_KEY", "UsdetCheckpointer", "config_with_normalization", "head_mismatch_message",
           "model_normalization", "set_pixel_normalization"]

logger = logging.getLogger(__name__)

#: checkpoint key of the input normalization the weights were trained with (``model_normalization``)
NORMALIZATION_KEY = "usdet_normalization"
#: checkpoint key of a label-free site adaptation's record (``usdet.experiments.adapt``)
ADAPTATION_KEY = "usdet_adaptation"
#: values closer than this are the same normalization (configs round statistics to 4 decimals)
_NORM_TOL = 1e-3

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

    def __init__(self, model, save_dir: str = "", *, num_classes: int = 0, normalization_from_checkpoint: bool = True,
                 **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.num_classes = int(num_classes)
        # True for inference (the weights' own normalization); the trainer passes False: a run
        # trains with its config's normalization, and records that one in its checkpoints.
        self.normalization_from_checkpoint = bool(normalization_from_checkpoint)
        #: after a load: the model's normalization and where it came from ("checkpoint" / "config")
        self.normalization: Optional[Dict[str, Any]] = None
        self._loading = ""
        if self.save_dir and self.save_to_disk and os.path.isdir(self.save_dir):
            # Leftovers of a save that was killed before its rename: never valid, safe to drop.
            for tmp in glob.glob(os.path.join(self.save_dir, ".*.pth.*.tmp")):
                try:
                    os.unlink(tmp)
                    logger.info("Removed the temporary file of an interrupted save: %s", tmp)
                except OSError:
                    pass

    @classmethod
    def for_inference(cls, model: nn.Module, cfg: CfgNode, save_dir: str = "") -> "UsdetCheckpointer":
        """The checkpointer every inference load uses (eval-only, predict, export, Grad-CAM, adapt_site)."""
        return cls(model, save_dir, num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES,
                   normalization_from_checkpoint=bool(cfg.INPUT.get("NORMALIZATION_FROM_CHECKPOINT", True)))

    def _write(self, basename: str, data: Dict[str, Any]) -> str:
        record = model_normalization(self.model)
        if record is not None:
            data.setdefault(NORMALIZATION_KEY, record)
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
        self._loading = f
        if f.endswith(".pkl"):  # detectron2 / Caffe2 model-zoo weights: detectron2's own reader
            return super()._load_file(f)
        try:
            return super()._load_file(f)
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
            raise RuntimeError(f"{f}: not a readable checkpoint ({type(e).__name__}: {e})") from e

    def _load_model(self, checkpoint: Dict[str, Any]):
        """detectron2's loading, then the normalization the weights were trained with (module docstring)."""
        incompatible = super()._load_model(checkpoint)
        checkpoint = checkpoint if isinstance(checkpoint, dict) else {}
        self._apply_recorded_normalization(checkpoint)
        record = checkpoint.get(ADAPTATION_KEY)
        if isinstance(record, dict):
            self.logger.info("Weights adapted to a site without labels (%s on %s frame(s)); verdict: %s",
                             record.get("method"), record.get("num_images"), record.get("verdict"))
        return incompatible

    def _apply_recorded_normalization(self, checkpoint: Dict[str, Any]) -> None:
        model = getattr(self.model, "module", self.model)
        current = model_normalization(model)
        self.normalization = None if current is None else dict(current, source="config")
        record = checkpoint.get(NORMALIZATION_KEY)
        adapted = checkpoint.get(ADAPTATION_KEY)
        if not isinstance(record, dict) and isinstance(adapted, dict) and adapted.get("pixel_mean") is not None:
            # a site adaptation written before checkpoints recorded their normalization
            record = {"pixel_mean": adapted["pixel_mean"], "pixel_std": adapted["pixel_std"]}
        if current is None or not isinstance(record, dict) or record.get("pixel_mean") is None:
            return  # a checkpoint without the record (older usdet, detectron2, model zoo): the config's
        same = _same_normalization(record, current)
        fmt_rec, fmt_cfg = record.get("input_format"), current.get("input_format")
        if same and (not fmt_rec or not fmt_cfg or fmt_rec == fmt_cfg):
            self.normalization["source"] = "checkpoint"
            return
        name = self._loading or "the checkpoint"
        theirs = (f"{name} was trained with PIXEL_MEAN {_fmt(record['pixel_mean'])} PIXEL_STD "
                  f"{_fmt(record['pixel_std'])}" + (f" ({fmt_rec} input)" if fmt_rec else ""))
        ours = (f"the config has {_fmt(current['pixel_mean'])} / {_fmt(current['pixel_std'])}"
                + (f" ({fmt_cfg})" if fmt_cfg else ""))
        if not self.normalization_from_checkpoint:
            self.logger.warning("%s; %s and its values are used (training, or INPUT.NORMALIZATION_FROM_CHECKPOINT "
                                "False)", theirs, ours)
            return
        if fmt_rec and fmt_cfg and fmt_rec != fmt_cfg:
            raise ValueError(f"{theirs}, but INPUT.FORMAT is {fmt_cfg}: its first layer expects {fmt_rec} channels. "
                             f"Set INPUT.FORMAT {fmt_rec} (or INPUT.NORMALIZATION_FROM_CHECKPOINT False to force the "
                             "config's normalization and channel order)")
        set_pixel_normalization(model, record["pixel_mean"], record["pixel_std"])
        self.normalization = dict(model_normalization(model), source="checkpoint")
        self.logger.warning("%s; %s: the checkpoint's are used (INPUT.NORMALIZATION_FROM_CHECKPOINT False forces "
                            "the config's)", theirs, ours)

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


def model_normalization(model: nn.Module) -> Optional[Dict[str, Any]]:
    """``{"pixel_mean", "pixel_std", "input_format"}`` of a detectron2 meta-architecture, or None.

    What the weights expect at their input: the buffers the model normalizes with (0-255, in
    ``input_format`` channel order), as the checkpoint records them.
    """
    model = getattr(model, "module", model)
    mean, std = getattr(model, "pixel_mean", None), getattr(model, "pixel_std", None)
    if not isinstance(mean, torch.Tensor) or not isinstance(std, torch.Tensor):
        return None
    record: Dict[str, Any] = {"pixel_mean": [float(v) for v in mean.detach().cpu().flatten()],
                              "pixel_std": [float(v) for v in std.detach().cpu().flatten()]}
    fmt = getattr(model, "input_format", None)
    if fmt:
        record["input_format"] = str(fmt)
    return record


def config_with_normalization(cfg: CfgNode, model: nn.Module) -> CfgNode:
    """A copy of ``cfg`` whose ``MODEL.PIXEL_MEAN/STD`` are the model's (after a checkpoint set them)."""
    record = model_normalization(model)
    if record is None:
        return cfg
    out = cfg.clone()
    out.defrost()
    out.MODEL.PIXEL_MEAN = [round(v, 4) for v in record["pixel_mean"]]
    out.MODEL.PIXEL_STD = [round(v, 4) for v in record["pixel_std"]]
    if cfg.is_frozen():
        out.freeze()
    return out


def _same_normalization(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    pairs = [(list(a[k]), list(b[k])) for k in ("pixel_mean", "pixel_std")]
    return all(len(x) == len(y) and all(abs(float(u) - float(v)) <= _NORM_TOL for u, v in zip(x, y))
               for x, y in pairs)


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{float(v):.6g}" for v in values) + "]"
