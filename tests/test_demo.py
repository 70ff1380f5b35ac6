"""tools/demo.py's own checks: one box per lesion on the full screens, drawn screens' truth."""
import json
import os

from train_helpers import load_tool

demo = load_tool("demo")


def _write(tmp_path, truth, boxes_by_screen):
    t, p = tmp_path / "truth.json", tmp_path / "predictions.json"
    t.write_text(json.dumps(truth))
    p.write_text(json.dumps([{"source": f"/x/{name}", "boxes": [{"bbox_xyxy_original": b, "score": s} for b, s in boxes]}
                             for name, boxes in boxes_by_screen.items()]))
    return str(t), str(p)


def test_check_screens_counts_one_box_per_lesion(tmp_path):
    truth = {"a.png": [[100, 100, 160, 140]], "b.png": [], "c.png": [[10, 10, 40, 40], [200, 200, 260, 250]]}
    good = {"a.png": [([102, 98, 161, 142], 0.9)], "b.png": [],
            "c.png": [([11, 10, 41, 39], 0.8), ([199, 201, 258, 252], 0.7)]}
    r = demo.check_screens(*_write(tmp_path, truth, good))
    assert r == {"screens": 3, "lesions": 3, "found": 3, "extra_boxes": 0, "missed": 0, "one_box_per_lesion": True}
    # a second box on the same lesion and a box on a lesion-free screen are extra; a lesion left out is missed
    bad = {"a.png": [([102, 98, 161, 142], 0.9), ([95, 105, 150, 150], 0.5)], "b.png": [([5, 5, 30, 30], 0.6)],
           "c.png": [([11, 10, 41, 39], 0.8)]}
    r = demo.check_screens(*_write(tmp_path, truth, bad))
    assert (r["found"], r["extra_boxes"], r["missed"], r["one_box_per_lesion"]) == (2, 2, 1, False)


def test_make_screens_maps_each_lesion_into_its_screen(tmp_path, phantom_dataset):
    truth_json = demo.make_screens(phantom_dataset, str(tmp_path / "screens"), count=3, split="val")
    with open(truth_json) as f:
        truth = json.load(f)
    with open(os.path.join(phantom_dataset, "annotations", "val.json")) as f:
        val = json.load(f)
    assert sorted(truth) == ["screen_00.png", "screen_01.png", "screen_02.png"]
    for k, im in enumerate(val["images"][:3]):
        anns = [a for a in val["annotations"] if a["image_id"] == im["id"]]
        boxes = truth[f"screen_{k:02d}.png"]
        assert len(boxes) == len(anns)
        for a, b in zip(anns, boxes):  # same size (the screen pastes the image 1:1 or scaled)
            assert b[2] > b[0] and b[3] > b[1]
            ratio_w, ratio_h = (b[2] - b[0]) / a["bbox"][2], (b[3] - b[1]) / a["bbox"][3]
            assert abs(ratio_w - ratio_h) < 0.1 * max(ratio_w, ratio_h)
        assert os.path.isfile(tmp_path / "screens" / f"screen_{k:02d}.png")


def test_demo_clip_step_truth_and_check(tmp_path):
    """make_clip writes a playable screen clip with per-frame truth; check_clip counts lesions found
    by reported boxes and boxes per lesion-free frame of both rules."""
    from usdet.data.clips import open_clip

    truth_json = demo.make_clip(str(tmp_path / "clip" / "sweep.mp4"), frames=120)
    with open(truth_json) as f:
        truth = json.load(f)
    frames = truth["frames"]
    assert len(frames) == 120 and sum(1 for _ in open_clip(str(tmp_path / "clip" / "sweep.mp4"))) == 120
    lesions = {lid for fr in frames for lid in fr["lesion_ids"]}
    free = [fr["frame"] for fr in frames if fr["lesion_free"]]
    assert lesions and free
    clip_dir = tmp_path / "pred"
    clip_dir.mkdir()
    records = []
    for fr in frames:
        boxes = [{"bbox_xyxy_original": b, "score": 0.9, "temporal_score": 0.8} for b in fr["boxes"]]
        if fr["frame"] == free[0]:  # one flickering false positive: the temporal rule drops it
            boxes.append({"bbox_xyxy_original": [5, 5, 30, 30], "score": 0.6, "temporal_score": 0.0})
        records.append({"frame": fr["frame"], "boxes": boxes})
    (clip_dir / "predictions.json").write_text(json.dumps(records))
    (clip_dir / "tracks.json").write_text(json.dumps({"temporal_rule": {"score_thresh": 0.4}, "tracks": []}))
    r = demo.check_clip(truth_json, str(clip_dir), 0.45)
    assert r["frames"] == 120 and r["lesions"] == len(lesions) and r["lesions_found"] == len(lesions)
    assert r["single_per_frame_sensitivity"] == r["temporal_per_frame_sensitivity"] == 1.0
    assert r["single_fp_per_lesion_free_frame"] == round(1 / len(free), 4)
    assert r["temporal_fp_per_lesion_free_frame"] == 0.0
