"""Score clip predictions against per-frame truth: single-frame vs temporal decision.

Measures (issue 22): per-frame lesion sensitivity (a lesion present in a frame counts as found
when a kept box has IoU >= ``iou_thresh`` with it), false positives per lesion-free frame (every
kept box on a frame with no part of any lesion), and per-lesion sensitivity (a lesion counts
when a kept box overlaps it on some frame: for the temporal rule, a box of a reported track).
A rule is a score per box: the detector's score (single frame) or the box's temporal score
(usdet.engine.tracking), so both have an operating curve, and "FP at equal per-frame sensitivity" compares
them at one sensitivity. Partly visible lesions (truth ``partial_boxes``) are neither to be
found nor false positives.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from usdet.evaluation.matching import box_iou_xyxy

__all__ = ["ClipTable", "clip_table", "merge_tables", "rule_metrics", "fp_at_sensitivity", "margin_threshold",
           "compare_rules"]


@dataclass
class ClipTable:
    """What the metrics need from one or more clips, per rule name ("single", "temporal").

    ``inst_best[rule]``: per lesion instance (a lesion in a frame), the best rule score among the
    boxes matching it (0 when none); ``inst_lesion``: the lesion (clip, id) of each instance;
    ``free_scores[rule]``: the rule score of every box on a lesion-free frame; ``n_free``: the
    number of lesion-free frames."""

    inst_best: Dict[str, np.ndarray] = field(default_factory=dict)
    inst_lesion: List[tuple] = field(default_factory=list)
    free_scores: Dict[str, np.ndarray] = field(default_factory=dict)
    n_free: int = 0
    n_frames: int = 0


def clip_table(records: Sequence[dict], truth_frames: Sequence[dict], iou_thresh: float = 0.5,
               clip_id: object = 0) -> ClipTable:
    """Build the table of one clip from its per-frame ``records`` (``predict_clip``: each box's
    ``score`` and ``temporal_score``) and the truth frames (``usdet.data.cine``)."""
    truth = {int(t["frame"]): t for t in truth_frames}
    best: Dict[str, List[float]] = {"single": [], "temporal": []}
    free: Dict[str, List[float]] = {"single": [], "temporal": []}
    lesions: List[tuple] = []
    n_free = 0
    for rec in records:
        t = truth.get(int(rec["frame"]))
        if t is None:
            continue
        boxes = np.array([b["bbox_xyxy_original"] for b in rec["boxes"]], np.float64).reshape(-1, 4)
        single = np.array([b["score"] for b in rec["boxes"]], np.float64)
        temporal = np.array([b.get("temporal_score", 0.0) for b in rec["boxes"]], np.float64)
        if not t["boxes"] and not t["partial_boxes"]:
            n_free += 1
            free["single"].extend(single.tolist())
            free["temporal"].extend(temporal.tolist())
            continue
        if t["boxes"]:
            iou = box_iou_xyxy(np.asarray(t["boxes"], np.float64), boxes) if len(boxes) else np.zeros((len(t["boxes"]), 0))
            for k, lid in enumerate(t["lesion_ids"]):
                hit = iou[k] >= iou_thresh
                best["single"].append(float(single[hit].max()) if hit.any() else 0.0)
                best["temporal"].append(float(temporal[hit].max()) if hit.any() else 0.0)
                lesions.append((clip_id, int(lid)))
    return ClipTable({k: np.asarray(v) for k, v in best.items()}, lesions,
                     {k: np.asarray(v) for k, v in free.items()}, n_free, len(records))


def merge_tables(tables: Sequence[ClipTable]) -> ClipTable:
    """One table over several clips (their lesions stay apart by clip id)."""
    out = ClipTable()
    for rule in ("single", "temporal"):
        out.inst_best[rule] = np.concatenate([t.inst_best[rule] for t in tables]) if tables else np.zeros(0)
        out.free_scores[rule] = np.concatenate([t.free_scores[rule] for t in tables]) if tables else np.zeros(0)
    out.inst_lesion = [x for t in tables for x in t.inst_lesion]
    out.n_free = sum(t.n_free for t in tables)
    out.n_frames = sum(t.n_frames for t in tables)
    return out


def rule_metrics(table: ClipTable, rule: str, thresh: float) -> dict:
    """Per-frame sensitivity, FP per lesion-free frame and per-lesion sensitivity of ``rule`` at ``thresh``."""
    best = table.inst_best[rule]
    found = (best >= thresh) & (best > 0)
    lesions = sorted(set(table.inst_lesion))
    hit = {lz: False for lz in lesions}
    for lz, f in zip(table.inst_lesion, found):
        hit[lz] = hit[lz] or bool(f)
    free = table.free_scores[rule]
    fp = int(((free >= thresh) & (free > 0)).sum())
    return {
        "threshold": round(float(thresh), 4),
        "per_frame_sensitivity": round(float(found.mean()), 4) if len(found) else None,
        "lesion_instances": int(len(found)),
        "fp_per_lesion_free_frame": round(fp / table.n_free, 4) if table.n_free else None,
        "fp_boxes_on_lesion_free_frames": fp,
        "lesion_free_frames": table.n_free,
        "per_lesion_sensitivity": round(sum(hit.values()) / len(hit), 4) if hit else None,
        "lesions": len(hit), "lesions_found": int(sum(hit.values())),
    }


def fp_at_sensitivity(table: ClipTable, rule: str, target: float) -> Optional[dict]:
    """``rule_metrics`` at the highest threshold whose per-frame sensitivity is >= ``target``
    (the fewest false positives at that sensitivity); None when no threshold reaches it."""
    best = np.sort(table.inst_best[rule][table.inst_best[rule] > 0])[::-1]
    n = len(table.inst_best[rule])
    if n == 0:
        return None
    k = max(1, int(math.ceil(target * n - 1e-9)))
    if k > len(best):
        return None
    return rule_metrics(table, rule, float(best[k - 1]))


def margin_threshold(table: ClipTable, rule: str, target: float) -> Optional[Tuple[float, float]]:
    """A threshold to ship, chosen on val: ``(threshold, margin)``. ``fp_at_sensitivity`` gives the
    highest threshold reaching ``target``, which sits on the weakest lesion needed and loses it
    on new clips at the slightest shift; lowering it keeps the same false positives down to the
    highest false-positive score below it. The midpoint of that gap is returned, with the gap's
    width (the wider, the safer the rule); None when ``target`` is out of reach."""
    at = fp_at_sensitivity(table, rule, target)
    if at is None:
        return None
    hi = at["threshold"]
    free = table.free_scores[rule]
    below = free[(free > 0) & (free < hi)]
    lo = float(below.max()) if len(below) else 0.0
    return (hi + lo) / 2, hi - lo


def compare_rules(table: ClipTable, single_thresh: float, temporal_thresh: float,
                  targets: Sequence[float] = (0.9,)) -> dict:
    """Single-frame at ``single_thresh`` vs temporal at ``temporal_thresh``, and each rule's FP at
    the other's per-frame sensitivity and at each of ``targets`` (e.g. FP90)."""
    single = rule_metrics(table, "single", single_thresh)
    temporal = rule_metrics(table, "temporal", temporal_thresh)
    out = {"single_frame": single, "temporal": temporal}
    s0 = single["per_frame_sensitivity"]
    if s0 is not None:
        at = fp_at_sensitivity(table, "temporal", s0)
        out["temporal_at_single_sensitivity"] = at
        if at is not None and single["fp_per_lesion_free_frame"]:
            out["fp_ratio_temporal_over_single"] = round(at["fp_per_lesion_free_frame"] /
                                                         single["fp_per_lesion_free_frame"], 4)
    for target in targets:
        out[f"at_sensitivity_{target:g}"] = {"single_frame": fp_at_sensitivity(table, "single", target),
                                             "temporal": fp_at_sensitivity(table, "temporal", target)}
    return out
