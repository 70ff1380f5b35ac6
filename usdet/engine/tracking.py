"""Link per-frame detections into lesion tracks, and decide which tracks are lesions.

A lesion persists across the frames of a sweep; speckle artefacts flicker. Tracks come from a
small assignment tracker (optimal one-to-one matching on IoU with scipy's
``linear_sum_assignment``, a constant-velocity guess of where each track's box is now, tracks
kept through short gaps); no maintained tracker library fits boxes without appearance
features and a per-frame score history at this size. The temporal decision is a k-of-n
persistence rule with a smoothed score: a track is a lesion when, in some window of ``window``
consecutive frames, it was detected with score >= ``hit_score`` in at least ``min_hits`` of
them and its mean score over the window (missed frames count 0) is >= ``score_thresh``. The
highest such mean is the track's ``decision_score``, so sweeping ``score_thresh`` gives the
rule's operating curve just as sweeping the box score does for single frames.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["TrackParams", "Track", "IoUTracker", "box_iou_xyxy", "TRACK_FIELDS"]


@dataclass(frozen=True)
class TrackParams:
    """The tracker's and the temporal rule's parameters (config: ``cfg.CLIP``)."""

    min_score: float = 0.05  # detections below this are not tracked
    track_iou: float = 0.3  # a detection continues a track when IoU with its predicted box >= this
    max_gap: int = 5  # a track unseen for more frames than this ends
    window: int = 10  # n of k-of-n
    min_hits: int = 5  # k of k-of-n
    hit_score: float = 0.3  # a frame counts as a hit when the track's detection scores >= this
    score_thresh: float = 0.4  # the window's mean score a lesion needs

    def __post_init__(self):
        if not 1 <= self.min_hits <= self.window:
            raise ValueError(f"CLIP.MIN_HITS must be in 1..CLIP.WINDOW ({self.window}), got {self.min_hits}")
        if self.max_gap < 0:
            raise ValueError(f"CLIP.MAX_GAP must be >= 0, got {self.max_gap}")
        if not 0.0 <= self.track_iou <= 1.0:
            raise ValueError(f"CLIP.TRACK_IOU must be in [0, 1], got {self.track_iou}")

    @classmethod
    def from_cfg(cls, cfg) -> "TrackParams":
        c = cfg.CLIP
        return cls(float(c.MIN_SCORE), float(c.TRACK_IOU), int(c.MAX_GAP), int(c.WINDOW), int(c.MIN_HITS),
                   float(c.HIT_SCORE), float(c.SCORE_THRESH))

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def box_iou_xyxy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes ``a`` (N,4) and ``b`` (M,4), xyxy."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(axis=1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


#: columns of the track table (CSV and JSON)
TRACK_FIELDS = ("track_id", "first_frame", "last_frame", "frames_seen", "peak_score", "peak_frame", "peak_box",
                "mean_score", "decision_score", "reported", "confirmed_frame", "label")


@dataclass
class Track:
    """One lesion candidate followed through the clip."""

    track_id: int
    first_frame: int
    last_frame: int
    box: np.ndarray  # last matched box (xyxy)
    label: str = "lesion"
    frames_seen: int = 0
    peak_score: float = 0.0
    peak_frame: int = -1
    peak_box: List[float] = field(default_factory=list)
    score_sum: float = 0.0
    decision_score: float = 0.0  # highest window mean among windows meeting k-of-n (0: never)
    confirmed_frame: Optional[int] = None  # first frame whose window met the rule at score_thresh
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(4))
    window: Deque[float] = field(default_factory=deque)  # scores of the last n frames (0 = missed)

    def predicted(self, frame: int) -> np.ndarray:
        """Where the box should be at ``frame`` (constant velocity since the last match)."""
        return self.box + self.velocity * (frame - self.last_frame)

    def row(self, score_thresh: float) -> dict:
        return {
            "track_id": self.track_id, "first_frame": self.first_frame, "last_frame": self.last_frame,
            "frames_seen": self.frames_seen, "peak_score": round(self.peak_score, 4), "peak_frame": self.peak_frame,
            "peak_box": [round(float(v), 2) for v in self.peak_box],
            "mean_score": round(self.score_sum / max(1, self.frames_seen), 4),
            "decision_score": round(self.decision_score, 4),
            "reported": self.decision_score > 0 and self.decision_score >= score_thresh,
            "confirmed_frame": self.confirmed_frame, "label": self.label,
        }


class IoUTracker:
    """Feed it frame by frame (``update``); ``tracks`` holds every track, ended ones included."""

    def __init__(self, params: TrackParams = TrackParams()):
        self.p = params
        self.tracks: Dict[int, Track] = {}
        self._active: List[int] = []
        self._next_id = 1
        self._last_frame: Optional[int] = None

    def _advance(self, tr: Track, score: float, frame: int) -> None:
        """Push this frame's score into the track's window and update its decision score."""
        p = self.p
        tr.window.append(score)
        if len(tr.window) > p.window:
            tr.window.popleft()
        hits = sum(1 for s in tr.window if s >= p.hit_score)
        if hits >= p.min_hits:
            mean = sum(tr.window) / p.window
            if mean > tr.decision_score:
                tr.decision_score = mean
            if tr.confirmed_frame is None and mean >= p.score_thresh:
                tr.confirmed_frame = frame

    def update(self, frame: int, boxes: Sequence[Sequence[float]], scores: Sequence[float],
               labels: Optional[Sequence[str]] = None) -> List[Optional[int]]:
        """Match this frame's detections to tracks; returns the track id of each detection
        (None for one below ``min_score``). Frames must come in increasing order."""
        if self._last_frame is not None and frame <= self._last_frame:
            raise ValueError(f"frames must increase: got {frame} after {self._last_frame}")
        # frames skipped entirely (none expected from usdet's readers) count as misses
        skipped = 0 if self._last_frame is None else frame - self._last_frame - 1
        self._last_frame = frame
        p = self.p
        boxes_a = np.asarray(boxes, np.float64).reshape(-1, 4)
        scores_a = np.asarray(scores, np.float64).reshape(-1)
        out: List[Optional[int]] = [None] * len(boxes_a)
        keep = [i for i in range(len(boxes_a)) if scores_a[i] >= p.min_score]
        active = [self.tracks[t] for t in self._active]
        for tr in active:
            for k in range(min(skipped, p.window)):
                self._advance(tr, 0.0, frame - skipped + k)
        matched_tracks, matched_dets = set(), set()
        if active and keep:
            pred = np.stack([t.predicted(frame) for t in active])
            iou = box_iou_xyxy(pred, boxes_a[keep])
            rows, cols = linear_sum_assignment(-iou)
            for r, c in zip(rows, cols):
                if iou[r, c] >= p.track_iou and iou[r, c] > 0:
                    i = keep[c]
                    tr = active[r]
                    gap = frame - tr.last_frame
                    step = (boxes_a[i] - tr.box) / max(gap, 1)
                    tr.velocity = step if tr.frames_seen == 1 else 0.5 * tr.velocity + 0.5 * step
                    self._hit(tr, frame, boxes_a[i], float(scores_a[i]), labels[i] if labels else None)
                    out[i] = tr.track_id
                    matched_tracks.add(tr.track_id)
                    matched_dets.add(i)
        for tr in active:
            if tr.track_id not in matched_tracks:
                self._advance(tr, 0.0, frame)
        self._active = [t.track_id for t in active if frame - t.last_frame <= p.max_gap]
        for i in keep:
            if i in matched_dets:
                continue
            tr = Track(self._next_id, frame, frame, boxes_a[i].copy())
            self._next_id += 1
            self.tracks[tr.track_id] = tr
            self._active.append(tr.track_id)
            # the window starts empty (frames before the track count 0): k hits of its own are needed
            self._hit(tr, frame, boxes_a[i], float(scores_a[i]), labels[i] if labels else None)
            out[i] = tr.track_id
        return out

    def _hit(self, tr: Track, frame: int, box: np.ndarray, score: float, label: Optional[str]) -> None:
        tr.box = box.copy()
        tr.last_frame = frame
        tr.frames_seen += 1
        tr.score_sum += score
        if label:
            tr.label = label
        if score > tr.peak_score:
            tr.peak_score, tr.peak_frame, tr.peak_box = score, frame, [float(v) for v in box]
        self._advance(tr, score, frame)

    def table(self) -> List[dict]:
        """One row per track (``TRACK_FIELDS``), by id."""
        return [self.tracks[t].row(self.p.score_thresh) for t in sorted(self.tracks)]

    def reported_ids(self, score_thresh: Optional[float] = None) -> List[int]:
        """Ids of the tracks the temporal rule reports as lesions (at ``score_thresh``, default the params')."""
        thr = self.p.score_thresh if score_thresh is None else score_thresh
        return [t for t in sorted(self.tracks) if self.tracks[t].decision_score >= thr and
                self.tracks[t].decision_score > 0]
