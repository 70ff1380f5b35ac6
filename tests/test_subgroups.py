"""Subgroup tables (--by) and the val-chosen operating point: values, bins, CLI, bad input."""
import json
import math

import pytest

from eval_synth import synth_gt, synth_model, take_images
from train_helpers import load_tool
from usdet.evaluation.coco_metrics import coco_bbox_metrics
from usdet.evaluation.compare import load_detection_data
from usdet.evaluation.froc import froc
from usdet.evaluation.operating_point import apply_threshold, choose_threshold, wilson_interval
from usdet.evaluation.penalized_iou import penalized_iou
from usdet.evaluation.subgroups import group_values, subgroup_tables


def test_device_rows_equal_scoring_each_device_alone():
    gt = synth_gt(80, seed=2, attrs=True)
    preds = synth_model(gt, 0.7, seed=3)
    g, data, _ = load_detection_data(gt, preds)
    t = subgroup_tables(g, data, ["device"], n_resamples=200, seed=0)["device"]
    assert [r["group"] for r in t["rows"]] == ["scannerA", "scannerB"]
    for r in t["rows"]:
        ids = [im["id"] for im in gt["images"] if im["device"] == r["group"]]
        sg, sp = take_images(gt, preds, ids)
        assert r["num_images"] == len(ids) == 40
        assert r["num_lesions"] == len(sg["annotations"])
        coco = coco_bbox_metrics(sg, sp)["metrics"]
        m = r["metrics"]
        assert m["AP50"]["estimate"] == pytest.approx(coco["AP50"], abs=1e-6)
        assert m["AP"]["estimate"] == pytest.approx(coco["AP"], abs=1e-6)
        assert m["piou"]["estimate"] == pytest.approx(penalized_iou(sg, sp)["score"])
        fr = froc(load_detection_data(sg, sp)[1])
        assert m["sens@0.5"]["estimate"] == pytest.approx(fr["sensitivity"][fr["fps_per_image"].index(0.5)])
        assert m["sens@1"]["estimate"] == pytest.approx(fr["sensitivity"][fr["fps_per_image"].index(1.0)])
        for k in ("AP50", "piou", "sens@0.5", "sens@1"):
            assert m[k]["low"] <= m[k]["estimate"] <= m[k]["high"], k
            assert m[k]["high"] > m[k]["low"], k
    assert t["rows"][0]["metrics"]["AP50"]["estimate"] != t["rows"][1]["metrics"]["AP50"]["estimate"]


def test_size_bins_in_mm_where_pixel_size_is_known_else_pixels_and_label():
    gt = {
        "images": [
            {"id": 1, "width": 200, "height": 200, "pixel_size_cm": 0.02},  # 50 px * 0.2 mm = 10 mm
            {"id": 2, "width": 200, "height": 200},  # 40 px
            {"id": 3, "width": 200, "height": 200},  # normal
            {"id": 4, "width": 200, "height": 200, "pixel_size_cm": 0.01},  # 60 px = 6 mm, and 120 px = 12 mm
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "bbox": [10, 10, 50, 30], "category_id": 2},
            {"id": 2, "image_id": 2, "bbox": [10, 10, 40, 20], "category_id": 1},
            {"id": 3, "image_id": 4, "bbox": [10, 10, 60, 20], "category_id": 1},
            {"id": 4, "image_id": 4, "bbox": [80, 10, 30, 120], "category_id": 2},
        ],
        "categories": [{"id": 1, "name": "benign"}, {"id": 2, "name": "malignant"}],
    }
    g, data, _ = load_detection_data(gt, [])
    assert group_values(g, data, "size") == ["10-20 mm", "32-96 px", "no lesion", "10-20 mm"]
    assert group_values(g, data, "label") == ["malignant", "benign", "normal", "benign+malignant"]
    t = subgroup_tables(g, data, ["size"], n_resamples=0)["size"]
    assert [r["group"] for r in t["rows"]] == ["no lesion", "10-20 mm", "32-96 px"]
    assert [r["num_lesions"] for r in t["rows"]] == [0, 3, 1]
    assert t["size_unit"] == "mm where pixel_size_cm is known, else px"
    with pytest.raises(ValueError, match="gt.json: no image has the key 'device'"):
        group_values(g, data, "device", source="gt.json")


def test_size_in_mm_undoes_the_converters_scale():
    """pixel_size_cm is the source's pixel size; boxes are in the written (shrunk) image's pixels."""
    from usdet.evaluation.subgroups import lesion_size_mm

    gt = {
        "images": [
            {"id": 1, "width": 100, "height": 100, "pixel_size_cm": 0.01, "scale": 0.5},  # 60 px written = 12 mm
            {"id": 2, "width": 200, "height": 200, "pixel_size_cm": 0.01},  # the same lesion unscaled: 120 px
            {"id": 3, "width": 100, "height": 100, "pixel_size_cm": 0.01, "scale": 0},  # unusable scale: px
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "bbox": [10, 10, 60, 20], "category_id": 1},
            {"id": 2, "image_id": 2, "bbox": [20, 20, 120, 40], "category_id": 1},
            {"id": 3, "image_id": 3, "bbox": [10, 10, 60, 20], "category_id": 1},
        ],
        "categories": [{"id": 1, "name": "lesion"}],
    }
    g, data, _ = load_detection_data(gt, [])
    assert group_values(g, data, "size") == ["10-20 mm", "10-20 mm", "32-96 px"]  # the old code: 6 mm, "0-10 mm"
    assert lesion_size_mm(gt["images"][0], 60) == pytest.approx(12.0)
    assert lesion_size_mm(gt["images"][1], 120) == pytest.approx(12.0)
    assert lesion_size_mm({"scale": 0.5}, 60) is None


def test_size_of_a_converted_shrunk_dataset_is_the_full_size_one(tmp_path):
    """BrEaST-layout phantoms converted at full size and with --max-size (scale 0.5): the same
    lesion sizes in mm (within the resize's rounding), not half of them."""
    from test_convert_sources import breast_case, make_breast, run

    from usdet.experiments.crossval import read_converted_dataset
    from usdet.evaluation.subgroups import lesion_size_mm

    root = tmp_path / "breast"
    folder = make_breast(root, [])
    rows = [breast_case(folder, n, "benign", seed=n)[0] for n in range(1, 7)]
    for r in rows:
        r["Pixel_size"] = 0.05  # 0.5 mm per source pixel
    make_breast(root, rows)
    sizes = {}
    for name, extra in (("full", []), ("shrunk", ["--max-size", "40"])):  # frames are 60 x 80
        assert run("breast", "--root", root, "--output", tmp_path / name, *extra) == 0
        doc = read_converted_dataset(str(tmp_path / name))
        g, data, _ = load_detection_data(doc, [])
        longest = {}
        for a in g["annotations"]:
            if not a.get("iscrowd", 0):
                longest[a["image_id"]] = max(longest.get(a["image_id"], 0.0), max(a["bbox"][2:]))
        images = {im["id"]: im for im in g["images"]}
        assert all(im.get("scale", 1.0) == (0.5 if name == "shrunk" else 1.0) for im in images.values())
        sizes[name] = {images[i]["source_file"]: lesion_size_mm(images[i], v) for i, v in longest.items()}
        bins = dict(zip([images[i]["source_file"] for i in data.image_ids.tolist()], group_values(g, data, "size")))
        sizes[name + "_bins"] = bins
    assert sorted(sizes["full"]) == sorted(sizes["shrunk"]) and len(sizes["full"]) == 6
    for f, mm in sizes["full"].items():
        assert mm > 4.0 and sizes["shrunk"][f] == pytest.approx(mm, abs=1.0), f  # 1 written px = 1 mm here
        edges = (0.0, 10.0, 20.0, 50.0)
        if min(abs(mm - e) for e in edges) > 1.0:
            assert sizes["shrunk_bins"][f] == sizes["full_bins"][f], f


def test_evaluate_json_by_writes_tables(tmp_path, capsys):
    gt = synth_gt(40, seed=4, attrs=True)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "p.json").write_text(json.dumps(synth_model(gt, 0.6, seed=5)))
    tool = load_tool("evaluate_json")
    out = tmp_path / "ev"
    rc = tool.main(["--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "p.json"), "--output", str(out),
                    "--by", "device", "--by", "size", "--by", "label", "--bootstrap", "100", "--no-plots"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert list(m["subgroups"]) == ["device", "size", "label"]
    assert sum(r["num_images"] for r in m["subgroups"]["device"]["rows"]) == 40
    assert sum(r["num_lesions"] for r in m["subgroups"]["size"]["rows"]) == m["inputs"]["num_truth_boxes"]
    assert {r["group"] for r in m["subgroups"]["label"]["rows"]} == {"lesion", "normal"}
    md = (out / "report.md").read_text()
    assert "### By device" in md and "### By size" in md and "| scannerA | 20 |" in md
    rc = tool.main(["--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "p.json"),
                    "--output", str(tmp_path / "ev2"), "--by", "scanner", "--bootstrap", "0"])
    assert rc == 2
    assert "gt.json: no image has the key 'scanner'" in capsys.readouterr().err
    assert not (tmp_path / "ev2").exists()  # refused before anything was written


def _data(top_lesion, top_normal):
    """Images with one lesion each (detected exactly at the given score; None = no detection), then normals."""
    images, anns, preds = [], [], []
    for i, s in enumerate(list(top_lesion) + list(top_normal), start=1):
        images.append({"id": i, "width": 100, "height": 100})
        if i <= len(top_lesion):
            anns.append({"id": i, "image_id": i, "bbox": [10, 10, 20, 20], "category_id": 1})
        if s is not None:
            preds.append({"image_id": i, "bbox": [10, 10, 20, 20], "score": s, "category_id": 1})
    gt = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "lesion"}]}
    return gt, preds


def test_operating_point_chosen_on_val_and_applied_to_test():
    val = load_detection_data(*_data([0.9, 0.8, 0.6, 0.3], [0.7, 0.2]))[1]
    op = choose_threshold(val, 0.75)  # 3 of 4 lesion images: the 3rd highest lesion score
    assert op["score_thresh"] == 0.6
    assert op["val"]["sensitivity"] == 0.75 and op["val"]["specificity"] == 0.5
    assert choose_threshold(val, 0.95)["score_thresh"] == 0.3
    assert choose_threshold(load_detection_data(*_data([0.9, None], [0.5]))[1], 0.95)["score_thresh"] == 0.0
    test = load_detection_data(*_data([0.95, 0.65, 0.59, None, 0.7], [0.61, 0.1, None, 0.3]))[1]
    r = apply_threshold(op, test)["test"]
    assert (r["tp"], r["fn"], r["tn"], r["fp"]) == (3, 2, 3, 1)
    assert r["sensitivity"] == 0.6 and r["specificity"] == 0.75
    # Wilson: (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)
    z, n, p = 1.959963984540054, 4, 0.75
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert r["specificity_ci"]["low"] == pytest.approx(c - h) and r["specificity_ci"]["high"] == pytest.approx(c + h)
    assert math.isnan(wilson_interval(0, 0)["low"])
    with pytest.raises(ValueError, match="no lesion image"):
        choose_threshold(load_detection_data(*_data([], [0.5]))[1])


def test_evaluate_json_operating_point_cli(tmp_path, capsys):
    for name, (les, nor) in {"val": ([0.9, 0.8, 0.6, 0.3], [0.7, 0.2]),
                             "test": ([0.95, 0.65, 0.59, None, 0.7], [0.61, 0.1, None, 0.3])}.items():
        gt, preds = _data(les, nor)
        (tmp_path / f"{name}_gt.json").write_text(json.dumps(gt))
        (tmp_path / f"{name}_p.json").write_text(json.dumps(preds))
    tool = load_tool("evaluate_json")
    out = tmp_path / "ev"
    rc = tool.main(["--gt", str(tmp_path / "test_gt.json"), "--pred", str(tmp_path / "test_p.json"),
                    "--val-gt", str(tmp_path / "val_gt.json"), "--val-pred", str(tmp_path / "val_p.json"),
                    "--target-sensitivity", "0.75", "--output", str(out), "--bootstrap", "0", "--no-plots"])
    assert rc == 0
    op = json.loads((out / "metrics.json").read_text())["operating_point"]
    assert op["score_thresh"] == 0.6 and op["test"]["specificity"] == 0.75
    assert "## Operating point chosen on val" in (out / "report.md").read_text()
    assert "test sensitivity 0.600, specificity 0.750" in capsys.readouterr().out
