"""The converter refuses what would silently give a wrong dataset: a test fold that selects nothing,
and a code bug in the per-image work (which must not read as a skipped file)."""
import os

import pytest

from test_convert_sources import NO_NEAR_DUPS, load, make_busbra, run
from train_helpers import load_tool


# ---------------------------------------------------------------------------------------------- folds
def test_test_fold_absent_from_the_folds_file_is_refused_with_the_folds_present(tmp_path, capsys):
    make_busbra(tmp_path / "root")  # kFold = case % 5 + 1: the published 1..5
    out = tmp_path / "out"
    assert run("busbra", "--root", tmp_path / "root", "--output", out, "--folds-file", "5-fold-cv.csv",
               "--test-fold", "0") == 2
    err = capsys.readouterr().err
    assert "--test-fold 0: no image of 5-fold-cv.csv is in fold 0; its folds are [1, 2, 3, 4, 5]" in err
    assert "count from 1" in err
    assert not os.path.exists(out / "report.json") and not os.path.exists(out / "annotations" / "test.json")
    # a fold that exists still converts, its images in test
    assert run("busbra", "--root", tmp_path / "root", "--output", out, "--folds-file", "5-fold-cv.csv",
               "--test-fold", "5") == 0
    images, _, _ = load(out)
    assert {s for s, im in images.items() if im["split"] == "test"} == {
        "Images/bus_0004-s.png", "Images/bus_0009-l.png", "Images/bus_0009-r.png"}


def test_test_fold_whose_images_are_all_skipped_is_refused(tmp_path, capsys):
    root = tmp_path / "root"
    make_busbra(root)
    for name in ("bus_0004-s", "bus_0009-l", "bus_0009-r"):  # fold 5 (case % 5 + 1 == 5): all unreadable
        (root / "Images" / f"{name}.png").write_bytes(b"")
    assert run("busbra", "--root", root, "--output", tmp_path / "out", "--folds-file", "5-fold-cv.csv",
               "--test-fold", "5") == 2
    err = capsys.readouterr().err
    assert "every image of fold 5 of 5-fold-cv.csv was skipped" in err and "zero-byte" in err
    assert not os.path.exists(tmp_path / "out" / "report.json")


def test_kfold_fold_that_selects_no_image_is_refused(tmp_path, capsys):
    make_busbra(tmp_path / "root", n_cases=2)  # two patients (case 1: two views), three folds
    codes = [run("busbra", "--root", tmp_path / "root", "--output", tmp_path / f"k{k}", "--folds", "3", "--fold", k,
                 *NO_NEAR_DUPS) for k in range(3)]
    assert sorted(codes) == [0, 0, 2]
    empty = codes.index(2)
    assert f"--folds 3 --fold {empty}: fold {empty} (folds count from 0) holds no image" in capsys.readouterr().err
    for k in range(3):
        if k != empty:
            images, _, _ = load(tmp_path / f"k{k}")
            assert any(im["split"] == "test" for im in images.values())


def test_help_says_which_fold_option_counts_from_which(capsys):
    with pytest.raises(SystemExit):
        load_tool("convert_to_coco").main(["busbra", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the test fold with --folds, counted from 0: 0..K-1" in text
    assert "BUS-BRA's count from 1 (1..5 in 5-fold-cv.csv), unlike --fold, which counts from 0" in text


# ---------------------------------------------------------------------------------------------- bugs
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_bug_in_the_per_image_work_fails_the_run_with_a_count_and_the_traceback(tmp_path, capsys, monkeypatch,
                                                                                  workers):
    import usdet.data.convert_image as core

    root = tmp_path / "root"
    truth = make_busbra(root, n_cases=4)
    (root / "Images" / "bus_0002-s.png").write_bytes(b"")  # bad input: still a reasoned skip, not a bug

    def buggy(mask, category_id):  # a code bug (forked workers inherit it)
        return {"bbox": [0, 0, 1, 1], "area": 1 / 0}

    monkeypatch.setattr(core, "mask_to_annotation", buggy)
    out = tmp_path / "out"
    assert run("busbra", "--root", root, "--output", out, "--workers", workers) == 1
    err = capsys.readouterr().err
    assert f"busbra: error: {len(truth) - 1} image(s) failed with an unexpected error, a bug" in err
    assert "Traceback (most recent call last)" in err and "in buggy" in err and "ZeroDivisionError" in err
    assert not os.path.exists(out / "report.json")  # the output stays marked incomplete
    monkeypatch.undo()  # without the bug: the same input converts, the bad file a reasoned skip
    assert run("busbra", "--root", root, "--output", out, "--workers", workers) == 0
    images, _, report = load(out)
    assert len(images) == len(truth) - 1
    assert [(s["file"], "zero-byte" in s["reason"]) for s in report["skipped"]] == [("Images/bus_0002-s.png", True)]
