"""predict.py and gradcam.py: trailing KEY VALUE pairs override the config wherever they stand,
also right after --input (whose nargs="+" used to swallow them, leaving opts empty)."""
import os

import pytest

from train_helpers import load_tool

PAIRS = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.3", "SEED", "7"]
BASE = ["--config-file", "c.yaml", "--weights", "w.pth"]


@pytest.mark.parametrize("tool", ["predict", "gradcam"])
def test_pairs_after_input_are_overrides_not_inputs(tool):
    parse = load_tool(tool).parse_args
    args = parse([*BASE, "--output", "out", "--input", "a.png", "frames/", *PAIRS])
    assert args.input == ["a.png", "frames/"] and args.opts == PAIRS
    # between --input and further options, before --input, and after --
    args = parse([*BASE, "--input", "a.png", *PAIRS[:2], "--output", "out", *PAIRS[2:]])
    assert args.input == ["a.png"] and args.output == "out" and args.opts == PAIRS
    args = parse([*BASE, *PAIRS[:2], "--input", "a.png", "--output", "out", "--", *PAIRS[2:]])
    assert args.input == ["a.png"] and args.opts == PAIRS
    assert parse([*BASE, "--input", "a.png", "--output", "out"]).opts == []


def test_gradcam_layer_list_keeps_its_modules_and_gives_up_the_pairs():
    args = load_tool("gradcam").parse_args([*BASE, "--output", "o", "--input", "a.png", "--layer",
                                            "backbone.bottom_up.res4", "backbone", *PAIRS])
    assert args.layer == ["backbone.bottom_up.res4", "backbone"] and args.opts == PAIRS


def test_an_existing_file_or_an_option_value_named_like_a_key_stays_what_it_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "TEST.PNG").write_bytes(b"")  # a frame whose name looks like a key (TEST is a config section)
    args = load_tool("predict").parse_args([*BASE, "--output", "SEED", "--input", "TEST.PNG", "b.png", *PAIRS])
    assert args.output == "SEED" and args.input == ["TEST.PNG", "b.png"] and args.opts == PAIRS
    assert os.path.exists("TEST.PNG")


def test_predict_applies_trailing_pairs(tmp_path, capsys):
    """End to end: the pair after --input reaches the config (an unknown key is named in the error)."""
    from train_helpers import QUICK_CFG

    rc = load_tool("predict").main(["--config-file", QUICK_CFG, "--weights", str(tmp_path / "w.pth"), "--output",
                                    str(tmp_path / "o"), "--input", str(tmp_path), "MODEL.NO_SUCH_KEY", "1"])
    assert rc == 2 and "MODEL.NO_SUCH_KEY" in capsys.readouterr().err
