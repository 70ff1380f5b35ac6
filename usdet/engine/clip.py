"""Detect, track and count lesions through a cine clip (video, multi-frame DICOM, frame folder).

The clip is streamed (usdet.data.clips: one frame in memory at a time, workspace cropped once per
clip and re-checked on layout changes); frames are preprocessed in a background thread and go
through the model in batches; detections are linked into tracks (usdet.engine.tracking) and the
temporal rule decides which tracks are lesions. Outputs per clip (``write_clip_outputs``):
per-frame records and COCO results with the frame index, the track table (CSV + JSON), an
H.264 overlay video and a strip of the tracks' peak frames. Nothing is read from a DICOM header
but pixels, frame counts, rate and ultrasound regions, and output names are ``clip_NNN``, so no
patient identifier reaches an output. A fault mid-clip ends that clip with one line naming the
file and the frame; the frames before it keep all their outputs.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from usdet.data.clips import ClipCropper, ClipReadError, open_clip
from usdet.engine.predictor import FramePredictor, _prefetch, instances_to_boxes
from usdet.engine.tracking import TRACK_FIELDS, IoUTracker, TrackParams

logger = logging.getLogger(__name__)

__all__ = ["ClipResult", "predict_clip", "retrack", "write_clip_outputs", "run_clips", "clip_params", "clip_tool"]

Box = Tuple[int, int, int, int]


def clip_params(predictor: FramePredictor, clip_opts: Sequence[str] = ()) -> TrackParams:
    """The tracker / temporal-rule parameters: the predictor's config ``CLIP`` keys, else usdet's
    defaults with ``clip_opts`` (``CLIP.KEY VALUE`` pairs) merged: an exported model carries no
    config, yet its clips take the same rule overrides as an eager one's."""
    cfg = getattr(predictor, "cfg", None)
    if cfg is None or "CLIP" not in cfg:
        from detectron2.config import get_cfg

        from usdet.config import add_usdet_config

        cfg = get_cfg()
        add_usdet_config(cfg)
        if clip_opts:
            cfg.merge_from_list(list(clip_opts))
    return TrackParams.from_cfg(cfg)


@dataclass
class ClipResult:
    """What one clip gave: per-frame ``records``, the ``tracks`` table, and how the clip was read."""

    source: str
    kind: str
    params: TrackParams
    score_thresh: float
    records: List[dict] = field(default_factory=list)
    tracks: List[dict] = field(default_factory=list)
    failure: Optional[dict] = None  # {frame, reason}: where the clip stopped
    announced_frames: Optional[int] = None
    fps: Optional[float] = None
    size: Optional[Tuple[int, int]] = None
    crop: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def reported(self) -> List[dict]:
        return [t for t in self.tracks if t["reported"]]

    def summary(self) -> dict:
        n = len(self.records)
        return {
            "source": self.source, "kind": self.kind, "frames": n, "announced_frames": self.announced_frames,
            "fps": self.fps, "size": list(self.size) if self.size else None, "failure": self.failure,
            "crop": self.crop, "score_thresh": self.score_thresh, "temporal_rule": self.params.to_dict(),
            "tracks": len(self.tracks), "lesion_tracks": len(self.reported),
            "frames_with_boxes_single_frame": sum(any(b["score"] >= self.score_thresh for b in r["boxes"])
                                                  for r in self.records),
            "frames_with_boxes_temporal": sum(any(b.get("reported") for b in r["boxes"]) for r in self.records),
            "seconds": round(self.seconds, 3), "frames_per_s": round(n / self.seconds, 2) if self.seconds > 0 else None,
        }


@dataclass
class _Frame:
    index: int
    boxes: List[Box]
    note: Optional[str]
    inputs: list


def predict_clip(
    predictor: FramePredictor,
    path: str,
    params: Optional[TrackParams] = None,
    score_thresh: float = 0.5,
    crop: bool = True,
    progress: bool = True,
    prefetch: int = 2,
    desc: str = "clip",
) -> ClipResult:
    """Run ``predictor`` over every frame of the clip at ``path``, track, and apply the temporal rule.

    Records: ``{frame, crop_boxes, boxes: [{bbox_xyxy_original, score, class, track_id,
    temporal_score, reported}]}`` (+ ``crop_note`` where the full frame was used); every box with
    score >= min(``score_thresh``, ``params.min_score``) is kept, ``score >= score_thresh`` being
    the single-frame decision and ``reported`` (temporal score >= ``params.score_thresh``) the
    temporal one. Raises :class:`ClipReadError` only when the clip cannot be
    opened at all; a fault later is recorded in ``failure``.
    """
    from tqdm import tqdm

    params = params or clip_params(predictor)
    clip = open_clip(path)
    result = ClipResult(os.fspath(path), clip.kind, params, float(score_thresh), announced_frames=clip.num_frames,
                        fps=clip.fps)
    cropper = ClipCropper(clip.regions, enabled=crop)
    tracker = IoUTracker(params)
    keep_thresh = min(params.min_score, float(score_thresh))
    names = predictor.class_names

    def produce() -> Iterator[_Frame]:
        for index, rgb in clip:
            boxes, note = cropper(rgb, index)
            try:
                inputs = [predictor.preprocess(np.ascontiguousarray(rgb[y0:y1, x0:x1])) for x0, y0, x1, y1 in boxes]
            except Exception as e:  # noqa: BLE001  (a frame the model cannot take ends the clip here)
                raise ClipReadError(clip.path, f"preprocessing failed ({type(e).__name__}: {e})", index) from None
            yield _Frame(index, list(boxes), note, inputs)

    def flush(batch: List[_Frame]) -> None:
        if not batch:
            return
        outputs = predictor.run_batch([x for f in batch for x in f.inputs])
        k = 0
        for f in batch:
            found: List[dict] = []
            for box in f.boxes:
                found.extend(instances_to_boxes(outputs[k], box, names, keep_thresh))
                k += 1
            found.sort(key=lambda b: -b["score"])
            ids = tracker.update(f.index, [b["bbox_xyxy_original"] for b in found], [b["score"] for b in found],
                                 [b["class"] for b in found])
            for b, tid in zip(found, ids):
                b["track_id"] = tid
            rec = {"frame": f.index, "crop_boxes": [list(b) for b in f.boxes], "boxes": found}
            if f.note:
                rec["crop_note"] = f.note
            result.records.append(rec)
            bar.update(1)

    bar = tqdm(total=clip.num_frames or None, desc=desc, unit="frame", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    batch: List[_Frame] = []
    try:
        try:
            for item in _prefetch(produce(), max(1, prefetch) * predictor.batch_size):
                batch.append(item)
                if sum(len(f.inputs) for f in batch) >= predictor.batch_size:
                    flush(batch)
                    batch = []
        except ClipReadError as e:
            result.failure = {"frame": e.frame, "reason": e.reason}
        flush(batch)  # the frames read before a fault still get their boxes
    finally:
        bar.close()
    result.seconds = time.perf_counter() - t0
    result.size = clip.size
    temporal = tracker.temporal_scores()
    result.tracks = tracker.table(temporal)
    _mark_temporal(result.records, temporal, params.score_thresh)
    result.crop = {"cropper_runs": cropper.calls, "layout_changes": cropper.changes, "crops": cropper.history}
    return result


def _mark_temporal(records: List[dict], temporal: Dict[int, Dict[int, float]], score_thresh: float) -> None:
    """Give every box its ``temporal_score`` and ``reported`` (temporal score >= ``score_thresh``)."""
    for rec in records:
        for b in rec["boxes"]:
            tid = b["track_id"]
            v = temporal[tid].get(int(rec["frame"]), 0.0) if tid is not None else 0.0
            b["temporal_score"] = round(v, 4)
            b["reported"] = v > 0 and v >= score_thresh


def retrack(records: Sequence[dict], params: TrackParams) -> Tuple[List[dict], List[dict]]:
    """Run the tracker and the temporal rule again on stored per-frame records (a clip's
    predictions.json) with other ``params``: ``(records with new track ids and temporal scores,
    track table)``. Boxes below the original run's kept threshold are not there to be tracked."""
    tracker = IoUTracker(params)
    out: List[dict] = []
    for rec in records:
        boxes = rec["boxes"]
        ids = tracker.update(int(rec["frame"]), [b["bbox_xyxy_original"] for b in boxes], [b["score"] for b in boxes],
                             [b.get("class", "lesion") for b in boxes])
        out.append({**rec, "boxes": [{**b, "track_id": i} for b, i in zip(boxes, ids)]})
    temporal = tracker.temporal_scores()
    _mark_temporal(out, temporal, params.score_thresh)
    return out, tracker.table(temporal)


# ---------------------------------------------------------------------------------------------
# Outputs


def coco_results(result: ClipResult, class_names: Sequence[str]) -> List[dict]:
    """Per-frame detections as COCO results (``image_id`` = frame index, bbox xywh), with track ids."""
    cat = {n: i + 1 for i, n in enumerate(class_names)}
    out = []
    for rec in result.records:
        for b in rec["boxes"]:
            x0, y0, x1, y1 = b["bbox_xyxy_original"]
            out.append({"image_id": rec["frame"], "frame": rec["frame"], "category_id": cat.get(b["class"], 1),
                        "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                        "score": b["score"], "track_id": b["track_id"], "temporal_score": b["temporal_score"],
                        "reported": b["reported"]})
    return out


def tracks_csv(tracks: Sequence[dict]) -> str:
    """The track table as CSV text (``peak_box`` as four columns)."""
    buf = io.StringIO()
    cols = [c for c in TRACK_FIELDS if c != "peak_box"]
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols[:6] + ["peak_x0", "peak_y0", "peak_x1", "peak_y1"] + cols[6:])
    for t in tracks:
        row = [t[c] for c in cols]
        writer.writerow(row[:6] + list(t["peak_box"]) + ["" if v is None else v for v in row[6:]])
    return buf.getvalue()


#: overlay colours (RGB): reported lesion tracks, boxes kept by the single-frame rule only, the crop
LESION_COLOR = (255, 80, 0)
SINGLE_COLOR = (170, 170, 170)
CROP_COLOR = (255, 230, 0)
#: overlay frames are enlarged until their long side reaches this (small clips stay legible)
VIDEO_LONG_SIDE = 640


def _masked(rgb: np.ndarray, crop_boxes: Sequence[Sequence[int]]) -> np.ndarray:
    """Only the image region(s): the workspace (burned-in name, ID, date) is blacked out."""
    out = np.zeros_like(rgb)
    for x0, y0, x1, y1 in crop_boxes:
        out[y0:y1, x0:x1] = rgb[y0:y1, x0:x1]
    return out


def draw_clip_frame(rgb: np.ndarray, rec: dict, score_thresh: float, scale: float) -> np.ndarray:
    """One overlay frame: workspace blacked out, lesion tracks (id, score) in orange, boxes the
    single-frame rule alone keeps in grey. OpenCV drawing: detectron2's Visualizer renders through
    matplotlib at tens of ms per frame, too slow for thousands of frames."""
    h, w = rgb.shape[:2]
    size = (int(round(w * scale)), int(round(h * scale)))
    if rec.get("crop_note"):  # no image region found: the full frame may show patient data
        out = np.zeros((size[1], size[0], 3), np.uint8)
        cv2.putText(out, f"frame {rec['frame']}: withheld (no image region found)", (8, 24),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
        return out
    out = cv2.resize(_masked(rgb, rec["crop_boxes"]), size, interpolation=cv2.INTER_LINEAR)
    thick = max(1, int(round(scale)))
    for x0, y0, x1, y1 in rec["crop_boxes"]:
        if (x0, y0, x1, y1) != (0, 0, w, h):
            cv2.rectangle(out, (int(x0 * scale), int(y0 * scale)), (int(x1 * scale) - 1, int(y1 * scale) - 1),
                          CROP_COLOR, 1)
    for b in sorted(rec["boxes"], key=lambda b: b["score"]):
        if not (b["reported"] or b["score"] >= score_thresh):
            continue
        x0, y0, x1, y1 = (int(round(v * scale)) for v in b["bbox_xyxy_original"])
        colour = LESION_COLOR if b["reported"] else SINGLE_COLOR
        cv2.rectangle(out, (x0, y0), (x1, y1), colour, 2 if b["reported"] else 1, cv2.LINE_AA)
        label = f"#{b['track_id']} {b['score']:.2f}" if b["reported"] else f"{b['score']:.2f}"
        ty = y0 - 4 if y0 > 14 else y1 + 12
        cv2.putText(out, label, (x0, ty), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * max(1.0, thick * 0.75), colour, 1,
                    cv2.LINE_AA)
    cv2.putText(out, f"frame {rec['frame']}", (6, size[1] - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1,
                cv2.LINE_AA)
    return out


def _peak_tile(rgb: np.ndarray, rec: dict, track: dict) -> np.ndarray:
    from usdet.visualization.overlay import _crop_around

    if rec.get("crop_note"):
        return np.zeros((64, 64, 3), np.uint8)
    img = _masked(rgb, rec["crop_boxes"])
    x0, y0, x1, y1 = track["peak_box"]
    cv2.rectangle(img, (int(round(x0)), int(round(y0))), (int(round(x1)), int(round(y1))), LESION_COLOR, 1)
    return _crop_around(img, track["peak_box"], margin=1.0).copy()


def write_clip_outputs(result: ClipResult, out_dir: str, class_names: Sequence[str], video: bool = True,
                       progress: bool = False) -> Dict[str, Optional[str]]:
    """Write the clip's outputs to ``out_dir``; returns their paths (relative to ``out_dir``).

    predictions.json, coco_results.json, tracks.json, tracks.csv, clip.json; overlay.mp4 and
    peaks.png come from a second streaming pass over the clip (the frames are not kept)."""
    from tqdm import tqdm

    from usdet.utils.io import atomic_write_image, atomic_write_json, atomic_write_text
    from usdet.visualization.overlay import contact_sheet
    from usdet.visualization.video import VideoWriter

    os.makedirs(out_dir, exist_ok=True)
    atomic_write_json(os.path.join(out_dir, "predictions.json"), result.records)
    atomic_write_json(os.path.join(out_dir, "coco_results.json"), coco_results(result, class_names))
    atomic_write_json(os.path.join(out_dir, "tracks.json"), {"temporal_rule": result.params.to_dict(),
                                                             "tracks": result.tracks})
    atomic_write_text(os.path.join(out_dir, "tracks.csv"), tracks_csv(result.tracks))
    paths: Dict[str, Optional[str]] = {"predictions": "predictions.json", "coco_results": "coco_results.json",
                                       "tracks_json": "tracks.json", "tracks_csv": "tracks.csv",
                                       "overlay_video": None, "peaks": None}
    summary = result.summary()
    reported = {t["track_id"]: t for t in result.reported}
    peaks_at: Dict[int, List[dict]] = {}
    for t in reported.values():
        peaks_at.setdefault(t["peak_frame"], []).append(t)
    tiles: Dict[int, Tuple[np.ndarray, str]] = {}
    if result.records and (video or peaks_at):
        last = result.records[-1]["frame"] if video else max(peaks_at)
        by_frame = {r["frame"]: r for r in result.records}
        h, w = result.size[1], result.size[0]  # type: ignore[index]
        scale = max(1.0, VIDEO_LONG_SIDE / float(max(h, w)))
        writer = VideoWriter(os.path.join(out_dir, "overlay.mp4"), result.fps or 15.0) if video else None
        bar = tqdm(total=len(result.records), desc="overlay", unit="frame", disable=not (progress and video))
        try:
            for index, rgb in open_clip(result.source):
                rec = by_frame.get(index)
                if rec is None or index > last:
                    break
                if writer is not None:
                    writer.write(draw_clip_frame(rgb, rec, result.score_thresh, scale))
                    bar.update(1)
                for t in peaks_at.get(index, []):
                    tiles[t["track_id"]] = (_peak_tile(rgb, rec, t),
                                            f"track {t['track_id']}: peak {t['peak_score']:.2f} at frame {index} "
                                            f"(frames {t['first_frame']}-{t['last_frame']}, seen {t['frames_seen']})")
                if index >= last:
                    break
        except ClipReadError:
            pass  # the same fault as the first pass: the frames before it are drawn
        finally:
            bar.close()
            if writer is not None:
                paths["overlay_video"] = "overlay.mp4" if writer.close() else None
                summary["overlay_codec"] = writer.codec
                if writer.note:
                    summary["overlay_note"] = writer.note
    sheet = contact_sheet([tiles[k] for k in sorted(tiles)],
                          f"{len(reported)} lesion track(s): peak frames" if reported else
                          "no lesion track reported", cols=min(4, max(1, len(tiles))), tile_size=220)
    atomic_write_image(os.path.join(out_dir, "peaks.png"), sheet)
    paths["peaks"] = "peaks.png"
    summary["outputs"] = paths
    atomic_write_json(os.path.join(out_dir, "clip.json"), summary)
    return paths


def run_clips(predictor: FramePredictor, inputs: Sequence[str], out_dir: str, score_thresh: float = 0.5,
              crop: bool = True, progress: bool = True, video: bool = True,
              params: Optional[TrackParams] = None,
              log: Callable[[str], None] = print) -> Tuple[List[dict], List[dict]]:
    """Every clip of ``inputs`` through ``predict_clip`` and ``write_clip_outputs`` into
    ``out_dir/clip_NNN/``; returns ``(clips, failures)``: one summary per clip that gave frames,
    and ``{source, frame, reason}`` per clip that stopped early or could not be opened (each
    also logged as one line)."""
    params = params or clip_params(predictor)
    clips: List[dict] = []
    failures: List[dict] = []
    for k, path in enumerate(inputs):
        name = f"clip_{k:03d}"
        try:
            result = predict_clip(predictor, path, params, score_thresh, crop, progress,
                                  desc=f"clip {k + 1}/{len(inputs)}")
        except ClipReadError as e:
            failures.append({"source": path, "frame": e.frame, "reason": e.reason})
            log(f"FAILED {path}: {e.reason}")
            continue
        if result.failure is not None:
            failures.append({"source": path, **result.failure})
            log(f"FAILED {path}: {result.failure['reason']} ({len(result.records)} frame(s) before it kept)")
        if not result.records:
            continue
        outputs = write_clip_outputs(result, os.path.join(out_dir, name), predictor.class_names, video=video,
                                     progress=progress)
        clips.append({"clip": name, **result.summary(), "outputs": outputs})
    return clips, failures


def clip_tool(predictor: FramePredictor, inputs: Sequence[str], out_dir: str, score_thresh: float = 0.5,
              crop: bool = True, progress: bool = True, report_extra: Optional[dict] = None,
              clip_opts: Sequence[str] = ()) -> int:
    """``tools/predict.py --clip``: run every clip, write ``out_dir/report.json``, print one line per
    clip and per fault; exit status 0 when some clip gave frames, else 1. ``clip_opts``: ``CLIP.*``
    overrides for a predictor without a config (an exported model)."""
    import sys

    from usdet.utils.io import atomic_write_json

    os.makedirs(out_dir, exist_ok=True)
    params = clip_params(predictor, clip_opts)
    clips, failures = run_clips(predictor, inputs, out_dir, score_thresh, crop, progress, params=params,
                                log=lambda line: print(line, file=sys.stderr))
    report = dict(report_extra or {})
    report.update({"mode": "clip", "score_thresh": score_thresh, "crop": crop, "temporal_rule": params.to_dict(),
                   "num_clips": len(inputs), "clips": clips, "failures": failures})
    atomic_write_json(os.path.join(out_dir, "report.json"), report)
    for c in clips:
        print(f"{c['clip']}: {c['frames']} frame(s) at {c['frames_per_s']} frames/s, {c['tracks']} track(s), "
              f"{c['lesion_tracks']} lesion track(s) reported; frames with a box: "
              f"{c['frames_with_boxes_single_frame']} single-frame (score >= {score_thresh}), "
              f"{c['frames_with_boxes_temporal']} temporal -> {os.path.join(out_dir, c['clip'])}")
    return 0 if clips else 1
