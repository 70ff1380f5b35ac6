"""Label-free adaptation of a trained detector to a new site's frames (``tools/adapt_site.py``).

A new hospital has its own scanners and no boxes drawn. What can change without labels is what a
BatchNorm model keeps of its training site's statistics:

- ``adabn``: the BatchNorm running mean/variance, re-estimated on the site's frames (AdaBN) with
  fvcore's ``update_bn_stats`` (detectron2's ``PreciseBN`` machinery), in a chosen scope
  (``backbone``: the ResNet; ``backbone+fpn``; ``all``: every BatchNorm of the model), optionally
  blended with the training statistics (``blend`` = weight of the site's);
- ``pixel-stats``: the input normalization, moved so that the site's pixel mean/std land where
  the training site's did (``MODEL.PIXEL_MEAN/STD``);
- ``pixel-stats+adabn``: both, the normalization first.

The result is an ordinary checkpoint (``{"model": weights, "usdet_normalization": the pixel
normalization it expects, "usdet_adaptation": record}``) that
``train_net.py --eval-only``, ``predict.py``, ``cross_eval.py`` and ``export_model.py`` load
through ``UsdetCheckpointer``, which applies the recorded (adapted) pixel normalization. The record says
what was adapted, on how many frames, from which folder (as given), with which parameters; it
holds no image file name. Without labels nothing here can tell whether the adaptation helps:
``adapt_site`` always says so, and with a labelled val set (``val_dataset``) it evaluates the
model before and after, paired, and claims a gain only when the interval is above zero.
"""
from __future__ import annotations

import logging
import math
import os
import random
import time
from collections import OrderedDict
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from usdet.engine.checkpoint import ADAPTATION_KEY, NORMALIZATION_KEY, config_with_normalization, \
    model_normalization, set_pixel_normalization

logger = logging.getLogger(__name__)

__all__ = ["METHODS", "SCOPES", "ADAPTATION_KEY", "AdaptError", "adapt_site", "adapted_normalization", "bn_modules",
           "check_on_val", "describe", "select_frames", "set_pixel_normalization", "site_pixel_stats", "update_bn"]

METHODS = ("adabn", "pixel-stats", "pixel-stats+adabn")
SCOPES = ("backbone", "backbone+fpn", "all")
CANNOT_TELL = ("Adaptation used no labels, so nothing here shows whether it helps: on a site it can lower "
               "detection (a probe on one hidden site lost 16 AP50 points). Check the adapted model on "
               "labelled images of that site (e.g. --val-dataset NAME) before using it.")


class AdaptError(ValueError):
    """A bad adaptation request (no frames, no BatchNorm layer to adapt, missing statistics)."""


# ---------------------------------------------------------------------------------------------
# Target frames: chosen from the folder, cropped by usdet's cropper, read twice (stats, BN).


FrameKey = Tuple[str, Optional[int], Optional[int]]  # (source, frame index, view)


def select_frames(sources: Sequence[str], max_images: int, seed: int, crop: bool) -> Tuple[List[FrameKey], Dict[str, int]]:
    """Up to ``max_images`` frames (0 = all) of ``sources`` in a seeded random order of sources.

    A cine folder holds runs of near-identical frames; drawing sources at random instead of
    taking the first N spreads the frames over the site. Returns the frame keys and counts
    (frames seen, failed sources, frames whose crop was refused and used whole).
    """
    from usdet.engine.predictor import _iter_frames

    order = list(sources)
    random.Random(seed).shuffle(order)
    keys: List[FrameKey] = []
    counts = {"sources_read": 0, "failed_sources": 0, "crop_refused": 0}
    for source in order:
        if max_images and len(keys) >= max_images:
            break
        counts["sources_read"] += 1
        for item in _iter_frames([source], crop):
            if item.error is not None:
                counts["failed_sources"] += 1
                logger.warning("skipped %s: %s", item.source, item.error)
                break
            if max_images and len(keys) >= max_images:
                break
            counts["crop_refused"] += int(item.crop_note is not None)
            keys.append((item.source, item.frame, item.view))
    return keys, counts


def iter_frames(keys: Sequence[FrameKey], crop: bool) -> Iterator[np.ndarray]:
    """The cropped RGB frames of ``keys``, in that order (each source read once)."""
    from usdet.engine.predictor import _iter_frames

    by_source: "OrderedDict[str, set]" = OrderedDict()
    for source, frame, view in keys:
        by_source.setdefault(source, set()).add((frame, view))
    for source, wanted in by_source.items():
        for item in _iter_frames([source], crop):
            if item.error is None and (item.frame, item.view) in wanted:
                x0, y0, x1, y1 = item.crop_box
                yield np.ascontiguousarray(item.original[y0:y1, x0:x1])


def site_pixel_stats(frames: Iterator[np.ndarray]) -> Dict[str, Any]:
    """Per-channel pixel mean/std (RGB, 0-255) of the cropped frames, as the converter's ``pixel_stats.json``."""
    from usdet.data.coco import PixelStats

    stats = PixelStats()
    for rgb in frames:
        stats.add(rgb)
    return stats.result(split="site")


def adapted_normalization(cfg, site: Dict[str, Any], source_stats: Optional[Tuple[List[float], List[float]]]
                          ) -> Tuple[List[float], List[float], List[float], List[float]]:
    """``(pixel_mean, pixel_std, source_mean_rgb, source_std_rgb)`` in ``INPUT.FORMAT`` order.

    The model was trained with normalization (m0, s0) on a site whose pixels had (muS, sigmaS);
    the new site has (muT, sigmaT). Choosing s = s0 * sigmaT / sigmaS and
    m = muT - s * (muS - m0) / s0 gives the new site's normalized pixels the training site's
    normalized mean and spread (with dataset normalization, m0 = muS and s0 = sigmaS, so simply
    m = muT, s = sigmaT). ``source_stats`` (RGB) is needed unless ``INPUT.NORMALIZATION`` is
    ``dataset`` (then the config's own statistics are the training site's).
    """
    fmt = str(cfg.INPUT.FORMAT).upper()
    order = (lambda v: list(v)) if fmt == "RGB" else (lambda v: list(v)[::-1])
    m0, s0 = [float(v) for v in cfg.MODEL.PIXEL_MEAN], [float(v) for v in cfg.MODEL.PIXEL_STD]
    if source_stats is None:
        if str(cfg.INPUT.NORMALIZATION).lower() != "dataset":
            raise AdaptError(f"INPUT.NORMALIZATION is {cfg.INPUT.NORMALIZATION!r}, so the config does not hold the "
                             "training site's pixel statistics: give --source-pixel-stats (the training split's "
                             "pixel_stats.json)")
        mu_s, sd_s = list(m0), list(s0)
    else:
        mu_s, sd_s = order(source_stats[0]), order(source_stats[1])
    mu_t, sd_t = order(site["mean"]), order(site["std"])
    if min(sd_t) <= 0 or any(math.isnan(v) for v in mu_t + sd_t):
        raise AdaptError(f"the site's frames have no pixel spread (mean {site['mean']}, std {site['std']})")
    std = [s0[c] * sd_t[c] / sd_s[c] for c in range(3)]
    mean = [mu_t[c] - std[c] * (mu_s[c] - m0[c]) / s0[c] for c in range(3)]
    return ([round(v, 4) for v in mean], [round(v, 4) for v in std], order(mu_s), order(sd_s))


# ---------------------------------------------------------------------------------------------
# BatchNorm statistics


def bn_modules(model: nn.Module, scope: str) -> "OrderedDict[str, nn.Module]":
    """The BatchNorm layers (fvcore's ``BN_MODULE_TYPES``) of ``model`` in ``scope``, by name."""
    from fvcore.nn.precise_bn import BN_MODULE_TYPES

    if scope not in SCOPES:
        raise AdaptError(f"scope must be one of {SCOPES}, got {scope!r}")
    if scope == "all":
        root, prefix = model, ""
    else:
        backbone = getattr(model, "backbone", None)
        if backbone is None:
            raise AdaptError(f"scope {scope!r} needs a model with a backbone")
        root = getattr(backbone, "bottom_up", backbone) if scope == "backbone" else backbone
        prefix = "backbone.bottom_up." if scope == "backbone" and root is not backbone else "backbone."
    return OrderedDict((prefix + n, m) for n, m in root.named_modules() if isinstance(m, BN_MODULE_TYPES))


class _StatsForward(nn.Module):
    """What fvcore's ``update_bn_stats`` calls: the part of the detector whose BatchNorm layers are
    adapted, on a batch of preprocessed frames, without labels (the heads run in inference)."""

    def __init__(self, model: nn.Module, scope: str):
        super().__init__()
        self.model = model
        self.scope = scope

    def forward(self, inputs: List[Dict[str, torch.Tensor]]) -> None:
        images = self.model.preprocess_image(inputs)
        if self.scope == "all":
            self.model.inference(inputs, do_postprocess=False)
        elif self.scope == "backbone" and hasattr(self.model.backbone, "bottom_up"):
            self.model.backbone.bottom_up(images.tensor)
        else:
            self.model.backbone(images.tensor)


def update_bn(model: nn.Module, batches: Iterable[List[Dict[str, torch.Tensor]]], scope: str, blend: float,
              num_batches: int, progress: bool = True) -> Dict[str, Any]:
    """Re-estimate the running statistics of the BatchNorm layers in ``scope`` on ``batches``.

    Only those layers are in training mode while fvcore's ``update_bn_stats`` runs (population
    mean/variance over all frames, any batch size); everything else stays in eval mode. Then
    ``running = (1 - blend) * training + blend * site`` (blend 1: plain AdaBN). Returns how far
    the statistics moved (mean absolute change of the running means, in training-std units).
    """
    from fvcore.nn.precise_bn import update_bn_stats

    layers = bn_modules(model, scope)
    if not layers:
        raise AdaptError(f"the model has no BatchNorm layer in scope {scope!r} (FrozenBN and GroupNorm keep no "
                         "statistics to adapt): use --method pixel-stats, or a model trained with BN")
    before = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in layers.items()}
    was_training = model.training
    model.eval()
    for m in layers.values():
        m.train()
    try:
        with torch.no_grad():
            update_bn_stats(_StatsForward(model, scope), batches, num_iters=num_batches,
                            progress="tqdm" if progress else None)
    finally:
        model.train(was_training)
        if not was_training:
            model.eval()
    shifts = []
    for n, m in layers.items():
        mean0, var0 = before[n]
        if blend < 1.0:
            m.running_mean.copy_((1.0 - blend) * mean0 + blend * m.running_mean)
            m.running_var.copy_((1.0 - blend) * var0 + blend * m.running_var)
        shifts.append(float(((m.running_mean - mean0).abs() / var0.clamp_min(1e-5).sqrt()).mean()))
    return {"num_bn_layers": len(layers), "bn_layers_first_last": [next(iter(layers)), list(layers)[-1]],
            "mean_shift_in_std": round(float(np.mean(shifts)), 4)}


# ---------------------------------------------------------------------------------------------
# The whole adaptation


def _read_stats_file(path: str) -> Tuple[List[float], List[float]]:
    from usdet.config import read_pixel_stats

    return read_pixel_stats(path)


def adapt_site(
    config_file: str,
    weights: str,
    images: Sequence[str],
    output: str,
    *,
    method: str = "adabn",
    scope: str = "backbone+fpn",
    max_images: int = 0,
    batch_size: int = 0,
    blend: float = 1.0,
    seed: int = 0,
    crop: bool = True,
    source_pixel_stats: Optional[str] = None,
    device: Optional[str] = None,
    opts: Sequence[str] = (),
    val_dataset: Optional[str] = None,
    bootstrap: int = 1000,
    require_gain: bool = False,
    progress: bool = True,
) -> Dict[str, Any]:
    """Adapt the model of ``config_file`` + ``weights`` to the frames under ``images``; write ``output``.

    ``batch_size`` 0 = ``SOLVER.IMS_PER_BATCH`` (the batch BatchNorm saw in training). Returns the
    record written into the checkpoint (``usdet_adaptation``), with ``written`` False when
    ``require_gain`` held it back. Raises ``AdaptError`` / ``FileNotFoundError`` with one line.
    """
    from detectron2.modeling import build_model

    from usdet.data.sources import list_sources
    from usdet.engine.predictor import FramePredictor, build_predictor_cfg, load_inference_weights
    from usdet.utils.io import atomic_write

    if method not in METHODS:
        raise AdaptError(f"method must be one of {METHODS}, got {method!r}")
    if not 0.0 < blend <= 1.0:
        raise AdaptError(f"blend must be in (0, 1] (1 = the site's statistics alone), got {blend}")
    if max_images < 0 or batch_size < 0:
        raise AdaptError("max_images and batch_size must be >= 0 (0 = all frames / SOLVER.IMS_PER_BATCH)")
    if os.path.abspath(output) == os.path.abspath(weights):
        raise AdaptError(f"{output}: the output would overwrite the weights it adapts; choose another name")
    if source_pixel_stats and not os.path.isfile(source_pixel_stats):
        raise FileNotFoundError(f"{source_pixel_stats}: --source-pixel-stats file not found")
    for folder in images:
        if not os.path.exists(folder):
            raise FileNotFoundError(f"{folder}: image folder or file not found")
    t0 = time.time()
    cfg = build_predictor_cfg(config_file, weights, device, opts)
    model = build_model(cfg)
    weights_used, weights_note, _ = load_inference_weights(model, cfg)
    # the normalization the weights were trained with (their checkpoint's record), not the config's
    cfg = config_with_normalization(cfg, model)
    model.eval()
    source_stats = _read_stats_file(source_pixel_stats) if source_pixel_stats else None
    if "pixel-stats" in method and source_stats is None and str(cfg.INPUT.NORMALIZATION).lower() != "dataset":
        adapted_normalization(cfg, {"mean": [1.0] * 3, "std": [1.0] * 3}, None)  # raises the explanation
    batch_size = int(batch_size or cfg.SOLVER.IMS_PER_BATCH)

    sources = list_sources(list(images))
    if not sources:
        raise AdaptError(f"no images or DICOM files found in {' '.join(images)}")
    keys, counts = select_frames(sources, max_images, seed, crop)
    if not keys:
        raise AdaptError(f"none of the {len(sources)} source(s) in {' '.join(images)} could be read")
    if max_images and len(keys) < max_images:
        logger.warning("only %d frame(s) found for --max-images %d", len(keys), max_images)

    record: "OrderedDict[str, Any]" = OrderedDict()
    record["tool"] = "tools/adapt_site.py"
    record["method"] = method
    record["images_folder"] = [str(p) for p in images]
    record["num_images"] = len(keys)
    record["num_sources"] = counts["sources_read"]
    record["failed_sources"] = counts["failed_sources"]
    record["crop"] = bool(crop)
    record["crop_refused_used_whole"] = counts["crop_refused"]
    record["max_images"] = int(max_images)
    record["seed"] = int(seed)
    record["source_weights"] = str(weights)
    record["weights_adapted"] = weights_used
    record["config_file"] = str(config_file)
    record["test_size"] = [int(cfg.INPUT.MIN_SIZE_TEST), int(cfg.INPUT.MAX_SIZE_TEST)]

    if "pixel-stats" in method:
        site = site_pixel_stats(iter_frames(keys, crop))
        mean, std, mu_s, sd_s = adapted_normalization(cfg, site, source_stats)
        record["pixel_stats"] = OrderedDict(
            format=str(cfg.INPUT.FORMAT), site_mean_rgb=site["mean"], site_std_rgb=site["std"],
            training_site_mean=mu_s, training_site_std=sd_s,
            training_site_from=source_pixel_stats or "the config's dataset normalization",
            before_mean=[float(v) for v in cfg.MODEL.PIXEL_MEAN], before_std=[float(v) for v in cfg.MODEL.PIXEL_STD])
        record["pixel_mean"], record["pixel_std"] = mean, std
        set_pixel_normalization(model, mean, std)
    if "adabn" in method:
        pre = FramePredictor(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, cfg.INPUT.FORMAT, [], batch_size)
        num_batches = -(-len(keys) // batch_size)

        def batches() -> Iterator[List[Dict[str, torch.Tensor]]]:  # streamed: a big site never sits in memory
            batch: List[Dict[str, torch.Tensor]] = []
            for frame in iter_frames(keys, crop):
                batch.append(pre.preprocess(frame))
                if len(batch) == batch_size:
                    yield batch
                    batch = []
            if batch:
                yield batch

        bn = update_bn(model, batches(), scope, blend, num_batches=num_batches, progress=progress)
        record["bn"] = OrderedDict(scope=scope, batch_size=batch_size, num_batches=num_batches, blend=float(blend),
                                   estimator="fvcore update_bn_stats (population mean/variance over all frames)", **bn)
    record["seconds"] = round(time.time() - t0, 2)
    record["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    record["verdict"] = "unknown: no labels used, not checked on labelled data"
    record["warning"] = CANNOT_TELL

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # weights + the normalization they now expect (read back by UsdetCheckpointer) + the record
    norm = model_normalization(model)

    def checkpoint() -> Dict[str, Any]:
        return {"model": state, NORMALIZATION_KEY: norm, ADAPTATION_KEY: dict(record)}

    if val_dataset:
        tmp = output + ".unverified.pth"
        atomic_write(tmp, lambda fh: torch.save(checkpoint(), fh), "wb")
        try:
            check = check_on_val(config_file, weights, tmp, val_dataset, os.path.splitext(output)[0] + "_val",
                                 opts=list(opts) + (["MODEL.DEVICE", device] if device else []), bootstrap=bootstrap)
        finally:
            os.unlink(tmp)
        record["val_check"] = check
        record["verdict"] = check["verdict"]
        record.pop("warning")
    record["written"] = not (require_gain and record["verdict"] != "gain")
    if record["written"]:
        atomic_write(output, lambda fh: torch.save(checkpoint(), fh), "wb")
    return record


def check_on_val(config_file: str, weights: str, adapted: str, val_dataset: str, out_dir: str, *,
                 opts: Sequence[str] = (), bootstrap: int = 1000) -> Dict[str, Any]:
    """Evaluate the model before and after adaptation on a registered labelled dataset, paired.

    Both through ``cross_eval`` (the ``--eval-only`` path), then ``compare_models`` on the same
    images. Verdict ``gain`` / ``loss`` only when the AP50 interval excludes 0, else
    ``no detectable difference``.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from usdet.engine.setup import build_config
    from usdet.evaluation.compare import compare_models, interval_verdict
    from usdet.experiments.cross_eval import cross_evaluate

    if val_dataset not in DatasetCatalog.list():
        raise AdaptError(f"--val-dataset {val_dataset!r} is not registered (usdet registers <dataset>_<split> "
                         "under $USDET_DATASETS)")
    cfg = build_config(config_file, ["TEST.BOOTSTRAP", "0", *opts])
    r = cross_evaluate(cfg, OrderedDict([("before", weights), ("after", adapted)]), [val_dataset], out_dir,
                       plots=False, config_file=config_file)
    preds = OrderedDict((row["model"], os.path.join(out_dir, row["predictions"])) for row in r["rows"])
    c = compare_models(MetadataCatalog.get(val_dataset).get("json_file"), preds, os.path.join(out_dir, "comparison"),
                       n_resamples=max(int(bootstrap), 100), plots=False)
    verdict = interval_verdict(c["metrics"]["AP50"]["delta"], better="gain", worse="loss")
    out = OrderedDict(dataset=val_dataset, num_images=c["num_images"], verdict=verdict,
                      comparison=os.path.join(out_dir, "comparison", "comparison.json"))
    for k, v in c["metrics"].items():
        out[k] = OrderedDict(before=v["values"]["before"], after=v["values"]["after"], delta=v["delta"]["estimate"],
                             low=v["delta"]["low"], high=v["delta"]["high"], p_value=v["delta"]["p_value"])
    return out


def describe(record: Dict[str, Any]) -> str:
    """One line for logs and the tool: what was adapted, on how many frames."""
    parts = [f"{record['method']} on {record['num_images']} frame(s) from {', '.join(record['images_folder'])}"]
    if "bn" in record:
        b = record["bn"]
        parts.append(f"{b['num_bn_layers']} BatchNorm layer(s) ({b['scope']}, batch {b['batch_size']}, blend {b['blend']})")
    if "pixel_mean" in record:
        parts.append(f"PIXEL_MEAN {record['pixel_mean']} PIXEL_STD {record['pixel_std']}")
    return "; ".join(parts)
