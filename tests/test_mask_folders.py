"""Generic image + mask folders: table rows are keyed by the path under --images, never by a bare
stem shared by several sub-folders (issue 23 item 5)."""
import csv

import numpy as np

from test_convert_sources import load, phantom, reasons, run, write_png


def _tree(tmp_path, names):
    imgs, masks = tmp_path / "images", tmp_path / "masks"
    for k, name in enumerate(names):
        rgb, ms, _ = phantom(70 + k, ("benign",))
        write_png(imgs / f"{name}.png", rgb)
        write_png(masks / f"{name}_mask0.png", ms[0])
    return imgs, masks


def _table(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "label"])
        w.writerows(rows)
    return path


def _argv(imgs, masks, table):
    return ["masks", "--images", imgs, "--masks", masks, "--mask-pattern", "{dir}/{stem}_mask*.png", "--table", table]


def test_rows_keyed_by_path_do_not_swap_labels(tmp_path):
    """img1.png at the top and in sub/: the row 'img1' is the top one, 'sub/img1' the other, in
    whatever order. The old code let the bare stem 'img1' name sub/img1.png, so the later row
    relabelled it (benign instead of malignant) and the top image lost its row."""
    imgs, masks = _tree(tmp_path, ["img1", "sub/img1"])
    table = _table(tmp_path / "t.csv", [["sub/img1", "malignant"], ["img1", "benign"]])
    assert run(*_argv(imgs, masks, table), "--classes", "benign,malignant", "--output", tmp_path / "out") == 0
    images, anns, report = load(tmp_path / "out")
    assert {f: im["label"] for f, im in images.items()} == {"img1.png": "benign", "sub/img1.png": "malignant"}
    for f, cat in (("img1.png", 1), ("sub/img1.png", 2)):
        assert [a["category_id"] for a in anns[images[f]["id"]]] == [cat]
    assert report["skipped"] == []


def test_ambiguous_bare_names_are_refused_naming_both_files(tmp_path, capsys):
    imgs, masks = _tree(tmp_path, ["a/img1", "b/img1", "b/img2"])
    table = _table(tmp_path / "t.csv", [["img1.png", "benign"], ["img2", "malignant"]])
    assert run(*_argv(imgs, masks, table), "--output", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "t.csv row 2: image 'img1.png' is ambiguous, it matches a/img1.png and b/img1.png" in err
    assert not (tmp_path / "out" / "annotations").exists()
    # the same table with paths: every image gets its own row; a bare name that is unique still works
    table = _table(tmp_path / "t2.csv", [["a/img1.png", "malignant"], ["b/img1", "benign"], ["img2", "malignant"]])
    assert run(*_argv(imgs, masks, table), "--classes", "benign,malignant", "--output", tmp_path / "ok") == 0
    images, _, _ = load(tmp_path / "ok")
    assert {f: im["label"] for f, im in images.items()} == {"a/img1.png": "malignant", "b/img1.png": "benign",
                                                           "b/img2.png": "malignant"}
    # two rows naming one image (with and without extension): neither is used, both reported
    table = _table(tmp_path / "t3.csv", [["a/img1.png", "malignant"], ["a/img1", "benign"], ["b/img1", "benign"],
                                         ["img2", "benign"]])
    assert run(*_argv(imgs, masks, table), "--output", tmp_path / "two") == 0
    images, _, report = load(tmp_path / "two")
    assert "a/img1.png" not in images and set(images) == {"b/img1.png", "b/img2.png"}
    assert reasons(report)["t3.csv row 3"] == "rows 2 and 3 both name a/img1.png; none of them is used"
    assert np.all([im["label"] == "benign" for im in images.values()])
