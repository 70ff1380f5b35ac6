"""Metrics per subgroup of images (scanner, label, BI-RADS, lesion size, any image key), with CIs.

A single figure over a whole test set hides where a detector fails: one scanner, small lesions,
malignant ones. Each subgroup is scored on its own images (its truth and its detections only, so
FP/image rates are per image of the subgroup), with a bootstrap over those images.

Grouping rules:

* any image key (``device``, ``birads``, ``histology``, ...): the key's value; ``unknown`` where
  an image lacks it;
* ``label``: the image's ``label`` key when present, else the category names of its truth boxes
  (``normal`` without any);
* ``size``: the longest side of the image's largest truth box, in millimetres where the image has
  ``pixel_size_cm`` (the converters write it: the SOURCE image's pixel size), else in pixels; the
  unit is part of the bin name. Boxes are in the written image's pixels, so an image the converter
  shrank (``--max-size``, its ``scale`` = written pixels per source pixel) is measured back in
  source pixels first. Lesion-free images form the row ``no lesion``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .formatting import fmt_estimate as cell, markdown_table
from .inputs import DetectionData
from .weighted import full_values, metric_functions, percentile_ci, resampled_values, subset

__all__ = ["SUBGROUP_METRICS", "SIZE_BINS_MM", "SIZE_BINS_PX", "group_values", "lesion_size_mm", "subgroup_tables",
           "render_subgroups"]

SUBGROUP_METRICS = ("AP50", "AP", "piou", "sens@0.5", "sens@1")
#: Upper edges of the size bins (the last bin is open): mm (T1 <= 20 mm, T2 20-50 mm) and pixels.
SIZE_BINS_MM = (10.0, 20.0, 50.0)
SIZE_BINS_PX = (32.0, 96.0, 256.0)


def _bin_name(v: float, edges: Sequence[float], unit: str) -> str:
    lo = 0.0
    for e in edges:
        if v < e:
            return f"{lo:g}-{e:g} {unit}"
        lo = e
    return f">={lo:g} {unit}"


def _bin_order(name: str) -> float:
    if name == "no lesion":
        return -1.0
    head = name.lstrip(">=").split("-")[0].split()[0]
    try:
        value = float(head)
    except ValueError:
        return 1e9
    return value + (1e6 if name.endswith("px") else 0.0)


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and v == v


def lesion_size_mm(image: Dict[str, Any], length_px: float) -> Optional[float]:
    """``length_px`` (pixels of the image as written) in millimetres, or None without a usable
    ``pixel_size_cm``. ``pixel_size_cm`` is the source's pixel size; the converter's ``scale``
    (written pixels per source pixel, absent = 1) turns written pixels back into source pixels."""
    px = image.get("pixel_size_cm")
    scale = image.get("scale", 1.0)
    if not _positive(px) or not _positive(scale):
        return None
    return float(length_px) / float(scale) * float(px) * 10.0


def group_values(gt: Dict[str, Any], data: DetectionData, attribute: str, source: str = "ground truth") -> List[str]:
    """The subgroup name of each image of ``data`` (``gt`` is the cleaned COCO dict it came from)."""
    images = {im["id"]: im for im in gt["images"]}
    ims = [images[i] for i in data.image_ids.tolist()]
    n = data.num_images
    if attribute == "size":
        longest = np.zeros(n)
        if len(data.gt_image):
            np.maximum.at(longest, data.gt_image, data.gt_boxes[:, 2:].max(axis=1))
        has = data.gt_count_per_image() > 0
        out = []
        for k, im in enumerate(ims):
            if not has[k]:
                out.append("no lesion")
                continue
            mm = lesion_size_mm(im, longest[k])
            if mm is not None:
                out.append(_bin_name(mm, SIZE_BINS_MM, "mm"))
            else:
                out.append(_bin_name(longest[k], SIZE_BINS_PX, "px"))
        return out
    if attribute == "label" and not any("label" in im for im in ims):
        names: List[List[str]] = [[] for _ in range(n)]
        for img, cls in zip(data.gt_image.tolist(), data.gt_classes.tolist()):
            name = data.categories.get(cls, str(cls))
            if name not in names[img]:
                names[img].append(name)
        return ["+".join(sorted(x)) if x else "normal" for x in names]
    if not any(attribute in im for im in ims):
        present = sorted({k for im in ims for k in im} - {"id", "file_name", "width", "height"})
        raise ValueError(f"{source}: no image has the key {attribute!r} (image keys: {', '.join(present) or 'none'}; "
                         "also 'size' and 'label')")
    return ["unknown" if im.get(attribute) in (None, "") else str(im.get(attribute)) for im in ims]


def subgroup_tables(
    gt: Dict[str, Any],
    data: DetectionData,
    attributes: Sequence[str],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    source: str = "ground truth",
    **metric_options: Any,
) -> "OrderedDict[str, Any]":
    """One table per attribute: ``{attr: {"rows": [{"group", "num_images", "num_lesions", "metrics":
    {name: {"estimate", "low", "high"}}}], "size_unit"?}}``; ``metric_options`` go to
    :func:`usdet.evaluation.weighted.metric_functions` (penalized IoU and FROC settings)."""
    out: "OrderedDict[str, Any]" = OrderedDict()
    for attr in dict.fromkeys(attributes):
        groups = np.asarray(group_values(gt, data, attr, source), dtype=object)
        names = sorted(set(groups.tolist()), key=(_bin_order if attr == "size" else str))
        rows = []
        for g in names:
            sub = subset(data, groups == g)
            funcs = metric_functions(sub, SUBGROUP_METRICS, **metric_options)
            est = full_values(funcs, sub.num_images)
            ci = resampled_values([funcs], sub.num_images, n_resamples, seed)[0] if n_resamples > 0 else None
            metrics = OrderedDict()
            for k in SUBGROUP_METRICS:
                m = {"estimate": est[k]}
                if ci is not None:
                    m.update({x: v for x, v in percentile_ci(ci[k]).items() if x != "n_valid"})
                metrics[k] = m
            rows.append({"group": g, "num_images": int(sub.num_images), "num_lesions": int(len(sub.gt_image)),
                         "metrics": metrics})
        table: Dict[str, Any] = {"rows": rows, "n_resamples": int(n_resamples)}
        if attr == "size":
            units = {r["group"].split()[-1] for r in rows if r["group"] != "no lesion"}
            table["size_unit"] = "mm" if units == {"mm"} else "px" if units == {"px"} else "mm where pixel_size_cm is known, else px"
            table["size_rule"] = ("longest side of the image's largest truth box (mm: in source pixels, "
                                  "the converter's scale undone, times pixel_size_cm)")
        out[attr] = table
    return out


def render_subgroups(tables: Dict[str, Any]) -> str:
    """Markdown: one table per attribute, estimates with their 95% intervals."""
    lines = ["\n## Subgroups\n\n",
             "Each row is scored on its own images only (its truth boxes and detections; FP/image per image "
             "of the row), with a bootstrap 95% interval over those images. Sensitivity = FROC sensitivity "
             "at 0.5 and 1 false positive per image.\n"]
    for attr, t in tables.items():
        lines.append(f"\n### By {attr}\n\n")
        if attr == "size":
            lines.append(f"Size = {t['size_rule']}, in {t['size_unit']}.\n\n")
        header = ["group", "images", "lesions", "AP50", "AP", "penalized IoU", "sens @0.5 FP", "sens @1 FP"]
        rows = []
        for r in t["rows"]:
            m = r["metrics"]
            rows.append([str(r["group"]), str(r["num_images"]), str(r["num_lesions"]), cell(m["AP50"], 1),
                         cell(m["AP"], 1), cell(m["piou"], 3), cell(m["sens@0.5"], 3), cell(m["sens@1"], 3)])
        lines.append(markdown_table(header, rows))
    return "".join(lines)
