"""Link per-frame detections into lesion tracks, and decide which tracks are lesions.

A lesion persists across the frames of a sweep; speckle artefacts flicker. Tracks come from a
small assignment tracker (optimal one-to-one matching on IoU with scipy's
``linear_sum_assignment``, a constant-velocity guess of where each track's box is now, tracks
kept through short gaps); no maintained tracker library fits boxes without appearance
features and a per-frame score history at this size. The temporal decision is a k-of-n
persistence rule with a smoothed score, applied to each box of a track over the ``window``
frames centred on it: the box's ``temporal_score`` is the track's mean detection score over
those frames (missed frames count 0) when at least ``min_hits`` of them have a detection with
score >= ``hit_score``, else 0. The highest windowed score of a track is its
``decision_score``. Two decisions (``decision``):

- ``"track"``: a track is a lesion when its decision score is >= ``score_thresh``, and then every
  box of it is a lesion box (each box's temporal score is the track's decision score). A lesion
  seen clearly on some frames keeps its weak frames (entering, leaving, shadowed), while a
  structure the detector half-believes on many frames (scores hovering near 0.5) never gets a
  confident stretch: on the synthetic clips this is what separates lesions from persistent
  false positives, which a per-box rule cannot remove.
- ``"window"``: each box keeps its own windowed score, and is a lesion box when that is >=
  ``score_thresh``; a track is reported when one of its boxes is.

Sweeping ``score_thresh`` gives the rule's operating curve as sweeping the detector score does
for single frames. Clips are processed whole, so the window looks ahead as well as back, and
the track decision uses the whole track (an offline rule, like reading a recorded cine).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy.optimize import linear_sum_assignment

from usdet.evaluation.matching import box_iou_xyxy

__all__ = ["TrackParams", "Track", "IoUTracker", "TRACK_FIELDS", "DECISIONS"]

#: the temporal decisions (module docstring)
DECISIONS = ("track", "window")


@dataclass(frozen=True)
class TrackParams:
    """The tracker's and the temporal rule's parameters (config: ``cfg.CLIP``)."""

    min_score: float = 0.05  # detections below this are not tracked
    track_iou: float = 0.3  # a detection continues a track when IoU with its predicted box >= this
    max_gap: int = 5  # a track unseen for more frames than this ends
    window: int = 5  # n of k-of-n
    min_hits: int = 2  # k of k-of-n
    hit_score: float = 0.2  # a frame counts as a hit when the track's detection scores >= this
    score_thresh: float = 0.5  # the window's mean score a lesion needs
    decision: str = "window"  # "window": each box by its own window; "track": a track's best window decides all its boxes

    def __post_init__(self):
        if self.decision not in DECISIONS:
            raise ValueError(f"CLIP.DECISION must be one of {', '.join(DECISIONS)}, got {self.decision!r}")
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
                   float(c.HIT_SCORE), float(c.SCORE_THRESH), str(c.DECISION))

    def to_dict(self) -> dict:
        return dict(self.__dict__)


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
    peak_score: float = 0.0
    peak_frame: int = -1
    peak_box: List[float] = field(default_factory=list)
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(4))
    hits: List[Tuple[int, float]] = field(default_factory=list)  # (frame, detection score) per match

    @property
    def frames_seen(self) -> int:
        return len(self.hits)

    def predicted(self, frame: int) -> np.ndarray:
        """Where the box should be at ``frame`` (constant velocity since the last match)."""
        return self.box + self.velocity * (frame - self.last_frame)

    def temporal_scores(self, p: "TrackParams", bounds: Optional[Tuple[int, int]] = None) -> Dict[int, float]:
        """The temporal score of each of the track's boxes (by frame): the k-of-n rule on the
        ``p.window`` frames centred on it, or the track's best such score for every box when
        ``p.decision`` is "track" (see the module docstring). ``bounds``: the clip's first and last
        frame; the window slides inside them (else frames outside the clip count as misses)."""
        frames = np.array([f for f, _ in self.hits], np.int64)
        scores = np.array([s for _, s in self.hits], np.float64)
        before = (p.window - 1) // 2
        start = frames - before
        if bounds is not None:  # near the clip's ends the window slides inside it: no frame beyond counts as a miss
            first, last = bounds
            start = np.clip(start, first, max(first, last - p.window + 1))
        lo = np.searchsorted(frames, start, side="left")
        hi = np.searchsorted(frames, start + p.window, side="left")
        csum = np.concatenate([[0.0], np.cumsum(scores)])
        chit = np.concatenate([[0], np.cumsum(scores >= p.hit_score)])
        mean = (csum[hi] - csum[lo]) / p.window
        ok = (chit[hi] - chit[lo]) >= p.min_hits
        windowed = {int(f): float(m) if k else 0.0 for f, m, k in zip(frames, mean, ok)}
        if p.decision == "track":
            best = max(windowed.values(), default=0.0)
            return {f: best for f in windowed}
        return windowed

    def row(self, p: "TrackParams", temporal: Optional[Dict[int, float]] = None) -> dict:
        temporal = self.temporal_scores(p) if temporal is None else temporal
        decision = max(temporal.values()) if temporal else 0.0
        confirmed = [f for f, v in sorted(temporal.items()) if v > 0 and v >= p.score_thresh]
        return {
            "track_id": self.track_id, "first_frame": self.first_frame, "last_frame": self.last_frame,
            "frames_seen": self.frames_seen, "peak_score": round(self.peak_score, 4), "peak_frame": self.peak_frame,
            "peak_box": [round(float(v), 2) for v in self.peak_box],
            "mean_score": round(sum(s for _, s in self.hits) / max(1, self.frames_seen), 4),
            "decision_score": round(decision, 4), "reported": bool(confirmed),
            "confirmed_frame": confirmed[0] if confirmed else None, "label": self.label,
        }


class IoUTracker:
    """Feed it frame by frame (``update``); ``tracks`` holds every track, ended ones included;
    ``table()`` and ``temporal_scores()`` apply the temporal rule once the clip is over."""

    def __init__(self, params: TrackParams = TrackParams()):
        self.p = params
        self.tracks: Dict[int, Track] = {}
        self._active: List[int] = []
        self._next_id = 1
        self._last_frame: Optional[int] = None
        self._first_frame: Optional[int] = None

    def update(self, frame: int, boxes: Sequence[Sequence[float]], scores: Sequence[float],
               labels: Optional[Sequence[str]] = None) -> List[Optional[int]]:
        """Match this frame's detections to tracks; returns the track id of each detection
        (None for one below ``min_score``). Frames must come in increasing order."""
        if self._last_frame is not None and frame <= self._last_frame:
            raise ValueError(f"frames must increase: got {frame} after {self._last_frame}")
        self._last_frame = frame
        if self._first_frame is None:
            self._first_frame = frame
        p = self.p
        boxes_a = np.asarray(boxes, np.float64).reshape(-1, 4)
        scores_a = np.asarray(scores, np.float64).reshape(-1)
        out: List[Optional[int]] = [None] * len(boxes_a)
        keep = [i for i in range(len(boxes_a)) if scores_a[i] >= p.min_score]
        active = [self.tracks[t] for t in self._active if frame - self.tracks[t].last_frame <= p.max_gap + 1]
        matched = set()
        if active and keep:
            pred = np.stack([t.predicted(frame) for t in active])
            iou = box_iou_xyxy(pred, boxes_a[keep])
            rows, cols = linear_sum_assignment(-iou)
            for r, c in zip(rows, cols):
                if iou[r, c] >= p.track_iou and iou[r, c] > 0:
                    i = keep[c]
                    tr = active[r]
                    step = (boxes_a[i] - tr.box) / max(frame - tr.last_frame, 1)
                    tr.velocity = step if tr.frames_seen == 1 else 0.5 * tr.velocity + 0.5 * step
                    self._hit(tr, frame, boxes_a[i], float(scores_a[i]), labels[i] if labels else None)
                    out[i] = tr.track_id
                    matched.add(i)
        self._active = [t.track_id for t in active]
        for i in keep:
            if i in matched:
                continue
            tr = Track(self._next_id, frame, frame, boxes_a[i].copy())
            self._next_id += 1
            self.tracks[tr.track_id] = tr
            self._active.append(tr.track_id)
            self._hit(tr, frame, boxes_a[i], float(scores_a[i]), labels[i] if labels else None)
            out[i] = tr.track_id
        return out

    def _hit(self, tr: Track, frame: int, box: np.ndarray, score: float, label: Optional[str]) -> None:
        tr.box = box.copy()
        tr.last_frame = frame
        tr.hits.append((frame, score))
        if label:
            tr.label = label
        if score > tr.peak_score:
            tr.peak_score, tr.peak_frame, tr.peak_box = score, frame, [float(v) for v in box]

    def temporal_scores(self) -> Dict[int, Dict[int, float]]:
        """``{track_id: {frame: temporal score}}`` for every track."""
        bounds = None if self._first_frame is None else (self._first_frame, self._last_frame)
        return {t: self.tracks[t].temporal_scores(self.p, bounds) for t in sorted(self.tracks)}

    def table(self, temporal: Optional[Dict[int, Dict[int, float]]] = None) -> List[dict]:
        """One row per track (``TRACK_FIELDS``), by id."""
        temporal = self.temporal_scores() if temporal is None else temporal
        return [self.tracks[t].row(self.p, temporal[t]) for t in sorted(self.tracks)]

    def reported_ids(self) -> List[int]:
        """Ids of the tracks the temporal rule reports as lesions."""
        return [r["track_id"] for r in self.table() if r["reported"]]
