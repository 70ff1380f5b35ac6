"""Plots exist, have the expected size and are not blank; training curves tolerate partial files."""
import json
import os

import cv2
import numpy as np
import pytest

from usdet.evaluation import plots as P
from train_helpers import load_tool



def check_png(path, size=(640, 480), min_std=20.0):
    assert os.path.isfile(path), path
    img = cv2.imread(str(path))
    assert img is not None, f"{path} is not a readable image"
    if size is not None:
        assert (img.shape[1], img.shape[0]) == size
    # blank (or almost: a frame and a title only) images have little variance
    assert img.std() > min_std, f"{path} looks blank (std {img.std():.1f})"
    return img


def coloured_fraction(img):
    """Share of clearly coloured (non-grey) pixels: curves and heat cells, not axes and text."""
    b, g, r = [c.astype(int) for c in cv2.split(img)]
    return float(np.mean((np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)) > 60))


def test_evaluation_plots(tmp_path):
    rec = np.linspace(0, 1, 101)
    pr = {"lesion": {"recall": rec.tolist(), "precision_50": (1 - rec ** 2).tolist(), "precision_75": (0.8 - 0.8 * rec).tolist()}}
    img = check_png(P.plot_pr_curves(pr, str(tmp_path / "pr.png")))
    assert coloured_fraction(img) > 0.002
    img = check_png(P.plot_froc([0, 0.1, 0.5, 2, 6], [0, 0.4, 0.6, 0.8, 0.9], [0.125, 0.25, 0.5, 1, 2, 4, 8],
                                [0.4, 0.4, 0.6, 0.6, 0.8, 0.8, 0.9], str(tmp_path / "froc.png"), hit_rule="IoU >= 0.5", cpm=0.64))
    assert coloured_fraction(img) > 0.002
    img = check_png(P.plot_roc_curves({"lesion present": ([0, 0.2, 1], [0, 0.7, 1], 0.75)}, str(tmp_path / "roc.png")))
    assert coloured_fraction(img) > 0.002
    img = check_png(P.plot_confusion_matrix([[5, 1, 0], [2, 7, 1]], ["benign", "malignant"],
                                            ["benign", "malignant", "no detection"], str(tmp_path / "cm.png")))
    assert coloured_fraction(img) > 0.05
    sweep = {"score_thresh": list(np.round(np.arange(1, 20) * 0.05, 2)), "score": list(np.linspace(0.2, 0.5, 19))}
    img = check_png(P.plot_piou_sweep(sweep, 0.45, 0.4, str(tmp_path / "piou.png")))
    assert coloured_fraction(img) > 0.002


def test_empty_inputs_still_give_labelled_plots(tmp_path):
    check_png(P.plot_pr_curves({}, str(tmp_path / "pr.png")), min_std=5)
    check_png(P.plot_roc_curves({}, str(tmp_path / "roc.png")), min_std=5)
    check_png(P.plot_froc([0.0], [float("nan")], [0.125, 8], [float("nan")] * 2, str(tmp_path / "f.png")), min_std=5)
    sweep = {"score_thresh": [0.05, 0.5], "score": [None, None]}
    check_png(P.plot_piou_sweep(sweep, 0.45, float("nan"), str(tmp_path / "p.png")), min_std=5)


def _event_file(path, iters, lr0, partial=False, evals=True, resume_dup=False):
    lines = []
    for it in iters:
        rec = {"iteration": it, "total_loss": 2.0 / (1 + it / 10), "loss_cls": 1.0 / (1 + it / 10),
               "loss_box_reg": 0.5 / (1 + it / 20), "lr": lr0 * (0.1 if it > iters[-1] * 0.8 else 1),
               "time": 0.5, "data_time": 0.01, "eta_seconds": 10}
        lines.append(json.dumps(rec))
        if evals and it % 20 == 19:
            lines.append(json.dumps({"iteration": it, "bbox/AP": it / 5, "bbox/AP50": it / 3, "piou/score": it / 200,
                                     "piou/tp": it, "val_loss": 2.2 / (1 + it / 10)}))
    if resume_dup:
        lines.append(json.dumps({"iteration": iters[-1], "total_loss": 0.1, "lr": lr0}))
    text = "\n".join(lines) + "\n"
    if partial:
        text += '{"iteration": 999, "total_lo'
    path.write_text(text)
    return str(path)


def test_read_event_metrics_tolerates_partial_lines_and_resume(tmp_path):
    path = _event_file(tmp_path / "metrics.json", list(range(4, 100, 5)), 0.01, partial=True, resume_dup=True)
    recs, problems = P.read_event_metrics(path)
    assert len(problems) == 1 and "metrics.json:" in problems[0] and "not a complete JSON line" in problems[0]
    assert 999 not in recs and min(recs) == 4 and max(recs) == 99
    assert recs[99]["total_loss"] == 0.1  # the re-logged value after a resume wins
    assert recs[19]["bbox/AP50"] == pytest.approx(19 / 3) and recs[19]["loss_cls"] == pytest.approx(1 / 2.9)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        P.read_event_metrics(str(tmp_path / "nope.json"))


def test_training_curve_panels():
    keys = ["total_loss", "loss_cls", "loss_box_reg", "lr", "val_loss", "bbox/AP", "bbox/AP50", "bbox/APs",
            "piou/score", "piou/tp", "time", "data_time", "eta_seconds", "fast_rcnn/cls_accuracy",
            "rpn/num_pos_anchors"]
    keys += ["val_loss_cls", "val_loss_extra"]
    panels = dict(P.training_curve_panels(keys))
    assert list(panels)[:3] == ["total_loss (train, validation)", "loss_box_reg", "loss_cls (train, validation)"]
    assert panels["total_loss (train, validation)"] == ["total_loss", "val_loss"]
    assert panels["loss_cls (train, validation)"] == ["loss_cls", "val_loss_cls"]
    assert panels["validation loss"] == ["val_loss_extra"]
    assert panels["learning rate"] == ["lr"]
    assert panels["bbox (evaluation)"] == ["bbox/AP", "bbox/AP50"]
    assert panels["piou (evaluation)"] == ["piou/score"]
    assert panels["fast_rcnn (training)"] == ["fast_rcnn/cls_accuracy"]
    assert not any("time" in k or k.startswith("rpn/") for ks in panels.values() for k in ks)
    assert ["rpn/num_pos_anchors"] in dict(P.training_curve_panels(keys, everything=True)).values()


def test_plot_metrics_tool_two_stages(tmp_path, capsys):
    s1 = _event_file(tmp_path / "s1.json", list(range(4, 100, 5)), 0.02, partial=True)
    (tmp_path / "stage2").mkdir()
    _event_file(tmp_path / "stage2" / "metrics.json", list(range(4, 60, 5)), 0.005)
    tool = load_tool("plot_metrics")
    out = tmp_path / "curves.png"
    assert tool.main([f"stage1={s1}", str(tmp_path / "stage2"), "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert "s1.json:" in err and "not a complete JSON line" in err
    img = check_png(out, size=None)
    # 6 panels (total + val, box_reg, cls, lr, bbox, piou) in 3 columns of 500 px at 100 dpi
    assert img.shape[1] == 1500 and img.shape[0] == 2 * 340
    assert coloured_fraction(img) > 0.005
    assert tool.main([str(tmp_path / "missing.json"), "--output", str(out)]) == 2
    assert "missing.json: metrics file not found" in capsys.readouterr().err
