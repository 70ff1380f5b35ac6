"""Cine clips (issue 22): the synthetic cine generator, the streaming clip reader and its faults,
the once-per-clip crop, the tracker and temporal rule, the clip metrics, and tools/predict.py
--clip end to end on a generated video, multi-frame DICOM and frame folder."""
import csv
import io
import json
import os
import subprocess
import tracemalloc

import cv2
import numpy as np
import pytest
import torch

from usdet.data.cine import SyntheticCine, write_cine_dicom, write_cine_frames, write_cine_video
from usdet.data.clips import ClipCropper, ClipReadError, open_clip
from usdet.engine.tracking import IoUTracker, TrackParams
from train_helpers import QUICK_CFG, load_tool

SMALL = dict(size=(64, 80), sweep_frames=(12, 16))
ALL_BOXES = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]


# ---------------------------------------------------------------------------------------------
# generator


def test_cine_is_deterministic_with_lesions_entering_staying_and_leaving():
    kw = dict(size=(96, 120), sweep_frames=(60, 70))
    gen = SyntheticCine(seed=5, num_frames=140, **kw)
    a = list(gen)
    b = list(SyntheticCine(seed=5, num_frames=140, **kw))
    c = list(SyntheticCine(seed=6, num_frames=140, **kw))
    assert len(a) == 140 and [f.index for f in a] == list(range(140))
    assert all(np.array_equal(x.image, y.image) and x.truth() == y.truth() for x, y in zip(a, b))
    assert not all(np.array_equal(x.image, y.image) for x, y in zip(a, c))

    # each lesion of a whole sweep: partly visible, then present (box), then partly visible again
    whole = [(s, s + n) for s, n, k in gen.sweeps if k and s + n < 140]
    lesions = sorted({lid for f in a[whole[0][0]:whole[0][1]] for lid in f.lesion_ids}) if whole else []
    assert lesions, "seed 5 must pass over at least one lesion in a whole sweep"
    for lid in lesions:
        status = ["in" if lid in f.lesion_ids else "part" if lid in f.partial_ids else "" for f in a]
        first, last = min(i for i, s in enumerate(status) if s), max(i for i, s in enumerate(status) if s)
        seen = status[first:last + 1]
        assert "" not in seen, "visible on consecutive frames"
        first_in, last_in = seen.index("in"), len(seen) - 1 - seen[::-1].index("in")
        assert seen[:first_in] and set(seen[:first_in]) == {"part"}, "the lesion enters the image"
        assert set(seen[first_in:last_in + 1]) == {"in"} and last_in - first_in >= 5, "stays"
        assert seen[last_in + 1:] and set(seen[last_in + 1:]) == {"part"}, "and leaves"
    assert sum(f.lesion_free for f in a) >= 10, "lesion-free stretches"

    # the truth box is on the drawn (hypo-echoic) lesion: darker than the frame around it
    for f in a:
        for x0, y0, x1, y1 in f.boxes:
            inside = f.image[int(y0):int(y1), int(x0):int(x1), 0].astype(float)
            assert inside.mean() < 0.75 * f.image[..., 0].mean()
            assert 0 <= x0 < x1 <= 120 and 0 <= y0 < y1 <= 96
    assert gen.describe()["lesions"] == [{"id": k, "kind": v} for k, v in sorted(gen.lesion_kinds.items())]


def test_cine_speckle_decorrelates_gain_changes_and_probe_shakes():
    def frames(**kw):
        gen = SyntheticCine(seed=2, num_frames=12, **SMALL, **kw)
        return [f.image[..., 0].astype(float) for f in gen], gen._build_sweep(0).xs

    def aligned_corr(frames, xs, i):
        """Correlation of the tissue two consecutive frames share (the probe moved by xs[i+1]-xs[i])."""
        d = int(xs[i + 1] - xs[i])
        a, b = (frames[i][:, d:], frames[i + 1][:, :80 - d]) if d >= 0 else (frames[i][:, :80 + d], frames[i + 1][:, -d:])
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    still, xs = frames(speckle_corr=1.0, shake=0.0)
    moving, xs2 = frames(speckle_corr=0.5, shake=0.0)
    assert np.array_equal(xs, xs2) and len(set(np.diff(xs))) > 1  # the probe moves at an uneven speed
    c_still = [aligned_corr(still, xs, i) for i in range(10)]
    c_moving = [aligned_corr(moving, xs, i) for i in range(10)]
    fresh, _ = frames(speckle_corr=0.0, shake=0.0)
    c_fresh = [aligned_corr(fresh, xs, i) for i in range(10)]
    assert min(c_still) > 0.97  # tissue-anchored speckle only: the same pixels, moved (and gain-scaled)
    # part of the speckle is new in every frame: less alike, and least with all of it new
    assert np.mean(c_fresh) + 0.03 < np.mean(c_moving) < np.mean(c_still) - 0.03, (c_fresh, c_moving)
    # gain: frame brightness drifts and steps within a clip
    means = [f.mean() for f in still]
    assert max(means) / min(means) > 1.03
    # shake moves the image by a pixel or so: same clip with and without it differs
    shaken, xs3 = frames(speckle_corr=1.0, shake=1.5)
    assert not np.array_equal(xs, xs3) and max(abs(xs - xs3)) <= 3


def test_cine_on_a_screen_maps_boxes_and_changes_layout():
    frames = list(SyntheticCine(seed=1, num_frames=30, screen=True, layout_change_at=15, **SMALL))
    assert frames[0].crop_box != frames[20].crop_box
    assert {f.crop_box for f in frames[:15]} == {frames[0].crop_box}
    for f in frames:
        x0, y0, x1, y1 = f.crop_box
        for b in f.boxes:
            assert x0 <= b[0] < b[2] <= x1 and y0 <= b[1] < b[3] <= y1


# ---------------------------------------------------------------------------------------------
# reader: three formats, streamed, faults named by file and frame


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    cine = SyntheticCine(seed=3, num_frames=20, **SMALL)
    ref = [f.image for f in cine]
    out = {"ref": ref, "dir": d}
    out["frames_truth"] = write_cine_frames(cine, str(d / "frames"))
    out["video_truth"] = write_cine_video(cine, str(d / "clip.avi"))
    write_cine_dicom(cine, str(d / "clip.dcm"))
    write_cine_dicom(cine, str(d / "clip_rle.dcm"), transfer_syntax="1.2.840.10008.1.2.5")  # RLE Lossless
    return out


def test_reader_streams_every_format(clips):
    d, ref = clips["dir"], clips["ref"]
    got = list(open_clip(str(d / "frames")))
    assert [i for i, _ in got] == list(range(20))
    assert all(np.array_equal(g, r) for (_, g), r in zip(got, ref))
    for name in ("clip.dcm", "clip_rle.dcm"):
        clip = open_clip(str(d / name))
        assert clip.kind == "dicom" and clip.num_frames == 20 and clip.fps == 15.0
        got = list(clip)
        assert len(got) == 20 and all(np.array_equal(g, r) for (_, g), r in zip(got, ref))  # grey phantoms: exact
    clip = open_clip(str(d / "clip.avi"))
    assert clip.kind == "video" and clip.num_frames == 20 and clip.fps == 15.0
    got = list(clip)
    assert len(got) == 20 and max(np.abs(g.astype(int) - r).mean() for (_, g), r in zip(got, ref)) < 6  # MJPG


def test_frame_folder_is_in_natural_order(tmp_path):
    from usdet.utils.io import atomic_write_image

    for k in (10, 2, 1):
        atomic_write_image(str(tmp_path / f"f_{k}.png"), np.full((20, 24, 3), k, np.uint8))
    assert [int(rgb[0, 0, 0]) for _, rgb in open_clip(str(tmp_path))] == [1, 2, 10]


def _read_until_fault(path):
    got = []
    with pytest.raises(ClipReadError) as e:
        for i, rgb in open_clip(path):
            got.append(i)
    return got, e.value


def test_bad_clips_name_file_and_frame_and_keep_frames_before(clips, tmp_path):
    d = clips["dir"]
    # truncated video: the frames before the cut are read, the fault names the first missing one
    data = (d / "clip.avi").read_bytes()
    (tmp_path / "cut.avi").write_bytes(data[: int(len(data) * 0.6)])
    got, err = _read_until_fault(str(tmp_path / "cut.avi"))
    assert 3 <= len(got) < 20 and got == list(range(len(got)))
    assert err.frame == len(got) and "cut.avi" in str(err) and f"frame {len(got)}" in str(err) and "of the 20" in str(err)
    # truncated uncompressed DICOM: every complete frame, then the fault
    data = (d / "clip.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 64 * 80 * 7 - 10])
    got, err = _read_until_fault(str(tmp_path / "cut.dcm"))
    assert got == list(range(12)) and err.frame == 12 and "truncated" in str(err) and "cut.dcm" in str(err)
    # a frame of another size mid-clip
    from usdet.utils.io import atomic_write_image

    mixed = tmp_path / "mixed"
    for i, img in enumerate(clips["ref"][:6]):
        atomic_write_image(str(mixed / f"frame_{i:05d}.png"), img if i != 4 else cv2.resize(img, (60, 50)))
    got, err = _read_until_fault(str(mixed))
    assert got == [0, 1, 2, 3] and err.frame == 4 and "60x50" in str(err) and "80x64" in str(err)
    # zero frames: empty folder, zero-byte video, DICOM with no frames
    (tmp_path / "empty").mkdir()
    got, err = _read_until_fault(str(tmp_path / "empty"))
    assert got == [] and err.frame == 0 and "no frames" in str(err)
    (tmp_path / "zero.mp4").write_bytes(b"")
    with pytest.raises(ClipReadError, match="zero.mp4: frame 0: zero-byte"):
        open_clip(str(tmp_path / "zero.mp4"))
    write_cine_dicom(SyntheticCine(seed=0, num_frames=0, **SMALL), str(tmp_path / "none.dcm"))
    with pytest.raises(ClipReadError, match="none.dcm.*frame 0"):
        list(open_clip(str(tmp_path / "none.dcm")))
    # a codec nobody decodes: the AVI's fourcc replaced
    (tmp_path / "codec.avi").write_bytes((d / "clip.avi").read_bytes().replace(b"MJPG", b"ZZZ9"))
    with pytest.raises(ClipReadError, match=r"codec.avi: frame 0: .*codec"):
        list(open_clip(str(tmp_path / "codec.avi")))


def test_reading_is_memory_flat_in_clip_length(tmp_path):
    """Peak Python memory of streaming a clip (generation and reading) does not grow with its length."""
    def peak(n):
        path = str(tmp_path / f"c{n}.avi")
        write_cine_video(SyntheticCine(seed=1, num_frames=n, **SMALL), path)
        tracemalloc.start()
        count = sum(1 for _ in open_clip(path))
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert count == n
        return top

    short, long = peak(20), peak(400)
    assert long < short + 200_000, (short, long)  # 380 more frames of 15 KB each would be 5.8 MB


def test_cropper_runs_once_and_again_on_a_layout_change():
    cine = SyntheticCine(seed=1, num_frames=40, screen=True, layout_change_at=25, **SMALL)
    cropper = ClipCropper()
    for f in cine:
        boxes, note = cropper(f.image, f.index)
        assert note is None and boxes == [f.crop_box], f.index  # the drawn image region, exactly
    assert cropper.calls == 2 and cropper.changes == 1
    assert [h["frame"] for h in cropper.history] == [0, 25]
    steady = ClipCropper()
    for f in SyntheticCine(seed=1, num_frames=40, screen=True, **SMALL):
        steady(f.image, f.index)
    assert steady.calls == 1


# ---------------------------------------------------------------------------------------------
# tracker and temporal rule


def test_tracker_follows_a_moving_lesion_through_gaps_and_flicker_is_not_reported():
    p = TrackParams(min_score=0.05, track_iou=0.3, max_gap=3, window=6, min_hits=4, hit_score=0.3, score_thresh=0.4)
    tr = IoUTracker(p)
    rng = np.random.default_rng(0)
    lesion_ids = set()
    for f in range(30):
        boxes, scores = [], []
        if f not in (10, 11):  # the lesion is missed on two frames
            x = 20 + 3 * f  # moving 3 px per frame
            boxes.append([x, 40, x + 30, 70])
            scores.append(0.8 if f != 15 else 0.95)
        if f % 4 == 0:  # a speckle artefact somewhere else, one frame at a time
            x, y = rng.uniform(150, 300), rng.uniform(0, 100)
            boxes.append([x, y, x + 12, y + 12])
            scores.append(0.9)
        ids = tr.update(f, boxes, scores)
        if f not in (10, 11):
            lesion_ids.add(ids[0])
    assert len(lesion_ids) == 1, "one track through the gap (constant-velocity guess)"
    (lesion,) = [t for t in tr.table() if t["track_id"] in lesion_ids]
    assert (lesion["first_frame"], lesion["last_frame"], lesion["frames_seen"]) == (0, 29, 28)
    assert lesion["peak_score"] == 0.95 and lesion["peak_frame"] == 15 and lesion["peak_box"] == [65, 40, 95, 70]
    assert lesion["reported"] and lesion["decision_score"] == pytest.approx((5 * 0.8 + 0.95) / 6, abs=1e-4)
    assert lesion["confirmed_frame"] == 0  # frames -2..3 hold 4 hits, mean 3.2/6 >= 0.4
    others = [t for t in tr.table() if t["track_id"] not in lesion_ids]
    assert len(others) == 8 and not any(t["reported"] for t in others)
    assert tr.reported_ids() == [lesion["track_id"]]


def test_k_of_n_rule_exactly():
    def run(scores, **kw):
        p = TrackParams(**{**dict(window=5, min_hits=3, hit_score=0.5, score_thresh=0.3, max_gap=10), **kw})
        tr = IoUTracker(p)
        for f, s in enumerate(scores):
            tr.update(f, [[0, 0, 10, 10]] if s else [], [s] if s else [])
        return tr.table()[0]

    t = run([0.9, 0, 0.9, 0, 0.9])  # 3 hits in 5 frames
    assert t["reported"] and t["decision_score"] == pytest.approx(2.7 / 5)
    t = run([0.9, 0, 0.9, 0, 0, 0.9])  # never 3 hits within 5 consecutive frames
    assert not t["reported"] and t["decision_score"] == 0
    t = run([0.45, 0.45, 0.45, 0.45, 0.45])  # persistent, but below the hit score
    assert not t["reported"]
    t = run([0.6, 0.6, 0.6], score_thresh=0.4)  # 3 hits, but mean 1.8 / 5 < 0.4
    assert not t["reported"] and t["decision_score"] == pytest.approx(0.36)


def test_track_decision_keeps_a_lesions_weak_frames_and_drops_a_half_believed_structure():
    """CLIP.DECISION track: a track's best window decides every box of it; window: each box its own."""
    lesion = [0.3, 0.4, 0.95, 0.95, 0.95, 0.95, 0.95, 0.4, 0.3]  # enters, is seen clearly, leaves
    mimic = [0.55] * 9  # a structure the detector half-believes on every frame

    def run(decision):
        p = TrackParams(window=5, min_hits=3, hit_score=0.5, score_thresh=0.7, max_gap=2, decision=decision)
        tr = IoUTracker(p)
        for f in range(9):
            tr.update(f, [[0, 0, 20, 20], [60, 60, 80, 80]], [lesion[f], mimic[f]])
        return tr, tr.temporal_scores()

    tr, temporal = run("track")
    les, mim = (tr.table()[0], tr.table()[1])
    assert les["decision_score"] == pytest.approx(0.95) and les["reported"] and les["confirmed_frame"] == 0
    assert list(temporal[les["track_id"]].values()) == pytest.approx([0.95] * 9), "the weak entering/leaving frames count"
    assert mim["decision_score"] == pytest.approx(0.55) and not mim["reported"]
    # window decision: the entering frame's window (frames 0-4, slid inside the clip) is weaker
    tr, temporal = run("window")
    assert temporal[1][0] == pytest.approx((0.3 + 0.4 + 3 * 0.95) / 5)
    assert temporal[1][4] == pytest.approx(0.95)
    with pytest.raises(ValueError, match="CLIP.DECISION"):
        TrackParams(decision="vote")


def test_window_slides_inside_the_clip_at_its_ends():
    """A lesion in view from a clip's first frame: frames before the clip are not misses."""
    p = TrackParams(window=9, min_hits=7, hit_score=0.5, score_thresh=0.5, max_gap=2, decision="window")
    tr = IoUTracker(p)
    for f in range(20):
        tr.update(f, [[0, 0, 20, 20]], [0.9])
    temporal = tr.temporal_scores()[1]
    # frame 0: window frames 0-8 (slid from -4..4, which held 5 hits: below MIN_HITS, score 0)
    assert temporal[0] == pytest.approx(0.9) and temporal[19] == pytest.approx(0.9)
    assert temporal[10] == pytest.approx(0.9)


def test_cine_cut_mid_sweep_keeps_the_probe_pace():
    """A clip ending mid-sweep shows the start of the same sweep as a longer clip: the probe does not
    race across the strip in the few frames left (lesions would jump tens of pixels per frame)."""
    kw = dict(size=(64, 80), sweep_frames=(40, 50))
    long = list(SyntheticCine(seed=3, num_frames=130, **kw))
    cut = SyntheticCine(seed=3, num_frames=95, **kw)
    assert cut.sweeps[-1][1] < 40, "the short clip ends mid-sweep"
    short = list(cut)
    assert all(np.array_equal(a.image, b.image) and a.truth() == b.truth() for a, b in zip(short, long))


def test_assignment_is_optimal_not_greedy():
    """Greedy matching would give detection 1 to track A (IoU 0.6) and leave B unmatched."""
    tr = IoUTracker(TrackParams(track_iou=0.2, window=2, min_hits=1))
    ids0 = tr.update(0, [[0, 0, 10, 10], [7, 0, 17, 10]], [0.9, 0.9])  # A, B
    ids1 = tr.update(1, [[3, 0, 13, 10], [-2, 0, 8, 10]], [0.9, 0.9])
    # optimal: A->[-2..8] (IoU .67) + B->[3..13] (IoU .43); greedy takes A->[3..13] (.54) and B gets nothing
    assert ids1 == [ids0[1], ids0[0]]
    assert len(tr.tracks) == 2


# ---------------------------------------------------------------------------------------------
# metrics


def test_clip_metrics_single_vs_temporal():
    from usdet.evaluation.clips import clip_table, compare_rules, fp_at_sensitivity, rule_metrics

    truth = [
        {"frame": 0, "boxes": [[0, 0, 10, 10]], "lesion_ids": [1], "partial_boxes": [], "partial_ids": []},
        {"frame": 1, "boxes": [[0, 0, 10, 10]], "lesion_ids": [1], "partial_boxes": [], "partial_ids": []},
        {"frame": 2, "boxes": [], "lesion_ids": [], "partial_boxes": [[50, 50, 60, 60]], "partial_ids": [2]},
        {"frame": 3, "boxes": [], "lesion_ids": [], "partial_boxes": [], "partial_ids": []},
        {"frame": 4, "boxes": [], "lesion_ids": [], "partial_boxes": [], "partial_ids": []},
    ]
    box = lambda b, s, t: {"bbox_xyxy_original": b, "score": s, "temporal_score": t}  # noqa: E731
    records = [
        {"frame": 0, "boxes": [box([0, 0, 10, 10], 0.9, 0.5)]},
        {"frame": 1, "boxes": [box([1, 0, 11, 10], 0.4, 0.5), box([30, 30, 40, 40], 0.7, 0.0)]},
        {"frame": 2, "boxes": [box([50, 50, 60, 60], 0.8, 0.6)]},  # a partial lesion: not a false positive
        {"frame": 3, "boxes": [box([30, 30, 40, 40], 0.6, 0.0)]},
        {"frame": 4, "boxes": [box([70, 70, 80, 80], 0.95, 0.2), box([0, 0, 3, 3], 0.3, 0.0)]},
    ]
    table = clip_table(records, truth)
    assert table.n_free == 2 and len(table.inst_lesion) == 2
    s = rule_metrics(table, "single", 0.5)
    assert s["per_frame_sensitivity"] == 0.5 and s["fp_boxes_on_lesion_free_frames"] == 2
    assert s["fp_per_lesion_free_frame"] == 1.0 and s["per_lesion_sensitivity"] == 1.0
    t = rule_metrics(table, "temporal", 0.4)
    assert t["per_frame_sensitivity"] == 1.0 and t["fp_per_lesion_free_frame"] == 0.0 and t["lesions_found"] == 1
    assert fp_at_sensitivity(table, "single", 1.0)["threshold"] == 0.4
    assert fp_at_sensitivity(table, "single", 1.0)["fp_per_lesion_free_frame"] == 1.0
    out = compare_rules(table, 0.5, 0.4)
    assert out["temporal_at_single_sensitivity"]["fp_per_lesion_free_frame"] == 0.0
    assert out["fp_ratio_temporal_over_single"] == 0.0


# ---------------------------------------------------------------------------------------------
# tools/predict.py --clip


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from detectron2.modeling import build_model

    from usdet.engine.predictor import build_predictor_cfg

    d = tmp_path_factory.mktemp("clip_model")
    cfg = build_predictor_cfg(QUICK_CFG, "", "cpu", ALL_BOXES)
    torch.manual_seed(0)
    weights = str(d / "model.pth")
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    return QUICK_CFG, weights


def _predict(argv):
    return load_tool("predict").main(argv)


def _ffprobe(path):
    import imageio_ffmpeg

    r = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", path], capture_output=True, text=True)
    return r.stderr


def test_margin_threshold_ships_the_middle_of_the_val_gap():
    from usdet.evaluation.clips import ClipTable, fp_at_sensitivity, margin_threshold

    t = ClipTable(inst_best={"temporal": np.array([0.9, 0.85, 0.8, 0.3])}, inst_lesion=[(0, 1), (0, 1), (0, 2), (0, 2)],
                  free_scores={"temporal": np.array([0.6, 0.4, 0.0, 0.82])}, n_free=10, n_frames=14)
    at = fp_at_sensitivity(t, "temporal", 0.75)  # 3 of 4 instances: threshold 0.8, one FP (0.82) above it
    assert at["threshold"] == 0.8 and at["fp_boxes_on_lesion_free_frames"] == 1
    thr, margin = margin_threshold(t, "temporal", 0.75)  # same FP count down to 0.6: ship 0.7
    assert thr == pytest.approx(0.7) and margin == pytest.approx(0.2)
    assert margin_threshold(t, "temporal", 1.0) is not None and margin_threshold(t, "temporal", 1.01) is None


def test_predict_tool_on_video_dicom_and_frame_folder(tiny_model, tmp_path, capsys):
    cine = SyntheticCine(seed=4, num_frames=8, screen=True, **SMALL)
    truths = write_cine_video(cine, str(tmp_path / "scan.mp4"))
    write_cine_dicom(cine, str(tmp_path / "DOE_JANE_MRN-0042.dcm"), patient_name="Doe^Jane", patient_id="MRN-0042")
    write_cine_frames(SyntheticCine(seed=5, num_frames=6, **SMALL), str(tmp_path / "frames"))
    out = tmp_path / "out"
    rc = _predict(["--config-file", tiny_model[0], "--weights", tiny_model[1], "--clip", "--input",
                   str(tmp_path / "scan.mp4"), str(tmp_path / "DOE_JANE_MRN-0042.dcm"), str(tmp_path / "frames"),
                   "--output", str(out), "--score-thresh", "0.3", "--batch-size", "4", "--device", "cpu",
                   "--no-progress", *ALL_BOXES, "CLIP.WINDOW", "4", "CLIP.MIN_HITS", "2", "CLIP.HIT_SCORE", "0.1",
                   "CLIP.SCORE_THRESH", "0.05"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["failures"] == [] and [c["clip"] for c in report["clips"]] == ["clip_000", "clip_001", "clip_002"]
    assert [c["frames"] for c in report["clips"]] == [8, 8, 6]
    assert [c["kind"] for c in report["clips"]] == ["video", "dicom", "frames"]
    assert report["temporal_rule"]["window"] == 4 and report["temporal_rule"]["min_hits"] == 2  # from the config
    for c in report["clips"]:
        d = out / c["clip"]
        records = json.loads((d / "predictions.json").read_text())
        assert [r["frame"] for r in records] == list(range(c["frames"]))
        tracks = json.loads((d / "tracks.json").read_text())["tracks"]
        # COCO results: one per kept box, frame index as image_id, bbox xywh of the record's box
        coco = json.loads((d / "coco_results.json").read_text())
        flat = [(r["frame"], b) for r in records for b in r["boxes"]]
        assert len(coco) == len(flat) > 0
        for res, (frame, b) in zip(coco, flat):
            x0, y0, x1, y1 = b["bbox_xyxy_original"]
            assert res["image_id"] == res["frame"] == frame and res["track_id"] == b["track_id"]
            np.testing.assert_allclose(res["bbox"], [x0, y0, x1 - x0, y1 - y0], atol=0.011)
        # the track table: every tracked box belongs to a track whose span and count it matches
        ids = {}
        for frame, b in flat:
            if b["track_id"] is not None:
                ids.setdefault(b["track_id"], []).append((frame, b["score"]))
        assert sorted(ids) == [t["track_id"] for t in tracks]
        for t in tracks:
            seen = ids[t["track_id"]]
            assert (t["first_frame"], t["last_frame"], t["frames_seen"]) == (seen[0][0], seen[-1][0], len(seen))
            assert t["peak_score"] == pytest.approx(max(s for _, s in seen), abs=1e-4)
            mine = [b for _, b in flat if b["track_id"] == t["track_id"]]
            assert t["reported"] == any(b["reported"] for b in mine)
            assert t["decision_score"] == pytest.approx(max(b["temporal_score"] for b in mine), abs=1e-4)
            assert all(b["reported"] == (b["temporal_score"] >= 0.05 and b["temporal_score"] > 0) for b in mine)
        rows = list(csv.DictReader(io.StringIO((d / "tracks.csv").read_text())))
        assert [int(r["track_id"]) for r in rows] == [t["track_id"] for t in tracks]
        assert [r["reported"] == "True" for r in rows] == [t["reported"] for t in tracks]
        assert c["lesion_tracks"] == sum(t["reported"] for t in tracks)
        # a browser-playable overlay (H.264, yuv420p) with every frame, and the peak-frame strip
        info = _ffprobe(str(d / "overlay.mp4"))
        assert "h264" in info and "yuv420p" in info
        n = sum(1 for _ in open_clip(str(d / "overlay.mp4")))
        assert n == c["frames"]
        assert cv2.imread(str(d / "peaks.png")) is not None
    # screen clips: cropped once, on the drawn image region
    assert report["clips"][0]["crop"]["cropper_runs"] == 1
    assert report["clips"][0]["crop"]["crops"][0]["crop_boxes"] == [list(truths[0]["crop_box"])]
    # no patient identifier anywhere: file contents and names
    for root, _, files in os.walk(out):
        for name in files:
            assert "DOE" not in name.upper() and "MRN" not in name.upper()
            if name.endswith((".json", ".csv")):
                text = (open(os.path.join(root, name), encoding="utf-8").read())
                assert "Doe^Jane" not in text and "MRN-0042" not in text.replace("DOE_JANE_MRN-0042.dcm", "")
    # the overlay blacks out the workspace (burned-in name): the video's corner is black
    first = next(iter(open_clip(str(out / "clip_000" / "overlay.mp4"))))[1]
    assert first[:20, :60].max() < 30


def test_predict_tool_bad_clip_keeps_frames_before_the_fault(tiny_model, tmp_path, capsys):
    cine = SyntheticCine(seed=4, num_frames=12, **SMALL)
    write_cine_video(cine, str(tmp_path / "full.avi"))
    data = (tmp_path / "full.avi").read_bytes()
    (tmp_path / "cut.avi").write_bytes(data[: int(len(data) * 0.5)])
    (tmp_path / "junk.avi").write_bytes(b"RIFF" + b"\0" * 300)
    out = tmp_path / "out"
    rc = _predict(["--config-file", tiny_model[0], "--weights", tiny_model[1], "--input",
                   str(tmp_path / "cut.avi"), str(tmp_path / "junk.avi"), "--output", str(out), "--device", "cpu",
                   "--no-progress", *ALL_BOXES])
    assert rc == 0  # video files are clips without --clip
    report = json.loads((out / "report.json").read_text())
    (clip,) = report["clips"]
    k = clip["frames"]
    assert 2 <= k < 12
    failures = {os.path.basename(f["source"]): f for f in report["failures"]}
    assert failures["cut.avi"]["frame"] == k and failures["junk.avi"]["frame"] == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("FAILED")]
    assert len(lines) == 2
    assert "cut.avi" in lines[0] and f"frame {k}:" in lines[0]
    assert "junk.avi" in lines[1] and "frame 0:" in lines[1]
    records = json.loads((out / "clip_000" / "predictions.json").read_text())
    assert [r["frame"] for r in records] == list(range(k))
    assert sum(1 for _ in open_clip(str(out / "clip_000" / "overlay.mp4"))) == k


def test_trained_model_every_lesion_gets_a_reported_track(tmp_path):
    """A (briefly) phantom-trained detector on a generated clip: every lesion is found by a
    reported track, and the track carries the lesion through frames the single-frame rule misses
    (its scores there are under 0.5). Whether the rule also halves false positives is measured
    on the demo model by benchmarks/bench_clips.py, not here."""
    from train_helpers import train_phantom_detector

    from usdet.engine.clip import predict_clip
    from usdet.engine.predictor import BatchPredictor
    from usdet.evaluation.clips import clip_table, rule_metrics

    cfg, model = train_phantom_detector(iters=150, size=128, seed=0)
    cine = SyntheticCine(seed=11, num_frames=90, size=(128, 160), lesion_prob=1.0, sweep_frames=(45, 45))
    truths = write_cine_frames(cine, str(tmp_path / "frames"))
    params = TrackParams(min_score=0.05, track_iou=0.3, max_gap=5, window=9, min_hits=4, hit_score=0.2,
                         score_thresh=0.16)
    res = predict_clip(BatchPredictor(cfg, batch_size=8, model=model), str(tmp_path / "frames"), params,
                       score_thresh=0.5, progress=False)
    table = clip_table(res.records, truths)
    single, temporal = rule_metrics(table, "single", 0.5), rule_metrics(table, "temporal", 0.16)
    assert temporal["lesions"] == 3 and temporal["per_lesion_sensitivity"] == 1.0, temporal
    assert temporal["per_frame_sensitivity"] > single["per_frame_sensitivity"] + 0.15, (single, temporal)
    assert all(t["frames_seen"] >= 4 for t in res.reported)


def test_shared_multiframe_dicom_end_to_end(tiny_model, tmp_path):
    from conftest import REPO

    path = os.path.join(REPO, "..", "shared", "data", "dicom_us", "JPEGLosslessP14SV1_3s_2f_u_08_08.dcm")
    if not os.path.isfile(path):
        pytest.skip("shared multi-frame DICOM not present")
    out = tmp_path / "out"
    rc = _predict(["--config-file", tiny_model[0], "--weights", tiny_model[1], "--clip", "--input", path,
                   "--output", str(out), "--device", "cpu", "--no-progress", *ALL_BOXES])
    assert rc == 0
    (clip,) = json.loads((out / "report.json").read_text())["clips"]
    assert clip["frames"] == 2 and clip["failure"] is None and clip["size"] == [1024, 768]
    # the header's 2D tissue region is the crop (MaxX1/MaxY1 inclusive in the header)
    assert clip["crop"]["crops"][0]["crop_boxes"] == [[80, 28, 945, 569]]


def test_track_params_defaults_are_the_config_defaults():
    """One set of defaults: the dataclass's are cfg.CLIP's (chosen by benchmarks/bench_clips.py)."""
    from detectron2.config import get_cfg

    from usdet.config import add_usdet_config

    cfg = get_cfg()
    add_usdet_config(cfg)
    assert TrackParams.from_cfg(cfg) == TrackParams()
