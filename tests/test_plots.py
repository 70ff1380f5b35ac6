"""Plots draw the data they are given (matplotlib line data), are written as non-blank PNGs of the
expected size, and training curves tolerate partial files."""
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


@pytest.fixture()
def figures(monkeypatch):
    """The matplotlib figures the plot functions save (each still written as a PNG)."""
    saved = []
    real = P.save_figure

    def capture(fig, path):
        saved.append(fig)
        return real(fig, path)

    monkeypatch.setattr(P, "save_figure", capture)
    return saved


def _lines(fig):
    return {ln.get_label(): (np.asarray(ln.get_xdata(), float), np.asarray(ln.get_ydata(), float))
            for ax in fig.axes for ln in ax.get_lines()}


def test_plots_draw_the_given_data(tmp_path, figures):
    rec = np.linspace(0, 1, 101)
    p50, p75 = 1 - rec ** 2, 0.8 - 0.8 * rec
    P.plot_pr_curves({"lesion": {"recall": rec.tolist(), "precision_50": p50.tolist(), "precision_75": p75.tolist()}},
                     str(tmp_path / "pr.png"))
    lines = _lines(figures[-1])
    label50 = f"lesion, IoU 0.50 (AP50 {np.mean(p50) * 100:.1f})"
    assert np.allclose(lines[label50][0], rec) and np.allclose(lines[label50][1], p50)
    assert np.allclose(lines[f"lesion, IoU 0.75 (AP75 {np.mean(p75) * 100:.1f})"][1], p75)

    # FROC whose detections end at 2 FP/image: the measured curve stops there, dashed on at its end
    # value, and the extended rates 4 and 8 have hollow markers
    rates = [0.125, 0.25, 0.5, 1, 2, 4, 8]
    P.plot_froc([0, 0.1, 0.5, 2], [0, 0.4, 0.6, 0.8], rates, [0.4, 0.4, 0.6, 0.6, 0.8, 0.8, 0.8],
                str(tmp_path / "froc.png"), hit_rule="IoU >= 0.5", cpm=0.629, extended=[False] * 5 + [True] * 2)
    lines = _lines(figures[-1])
    x, y = lines["FROC"]
    assert x.tolist() == [0.0625, 0.0625, 0.1, 0.5, 2.0, 2.0] and y.tolist() == [0, 0, 0.4, 0.6, 0.8, 0.8]
    assert lines["at standard rates (CPM 0.629)"][0].tolist() == rates[:5]
    assert lines["at standard rates (CPM 0.629)"][1].tolist() == [0.4, 0.4, 0.6, 0.6, 0.8]
    assert lines["extended rates (end value carried)"][0].tolist() == [4, 8]
    assert lines["extended rates (end value carried)"][1].tolist() == [0.8, 0.8]
    x, y = lines["extended: no more detections, last value carried"]
    assert x.tolist() == [2.0, 16.0] and y.tolist() == [0.8, 0.8]

    P.plot_roc_curves({"lesion present": ([0, 0.2, 1], [0, 0.7, 1], 0.75)}, str(tmp_path / "roc.png"))
    x, y = _lines(figures[-1])["lesion present (AUC 0.750)"]
    assert x.tolist() == [0, 0.2, 1] and y.tolist() == [0, 0.7, 1]

    P.plot_confusion_matrix([[5, 1, 0], [2, 7, 1]], ["benign", "malignant"], ["benign", "malignant", "no detection"],
                            str(tmp_path / "cm.png"))
    texts = [t.get_text() for t in figures[-1].axes[0].texts]
    assert texts == ["5\n(83%)", "1\n(17%)", "0\n(0%)", "2\n(20%)", "7\n(70%)", "1\n(10%)"]

    sweep = {"score_thresh": [0.05, 0.5, 0.95], "score": [0.2, 0.45, None]}
    P.plot_piou_sweep(sweep, 0.45, 0.4, str(tmp_path / "piou.png"))
    lines = _lines(figures[-1])
    assert lines["penalized IoU"][0].tolist() == [0.05, 0.5, 0.95]
    assert np.allclose(lines["penalized IoU"][1], [0.2, 0.45, np.nan], equal_nan=True)
    assert lines["best 0.450 at s=0.50"][1].tolist() == [0.45]
    assert lines["chosen s=0.45 (0.400)"][0].tolist() == [0.45, 0.45]
    for name in ("pr", "froc", "roc", "cm", "piou"):
        check_png(str(tmp_path / f"{name}.png"))


def test_training_curves_draw_each_run_in_sequence(tmp_path, figures):
    runs = {"stage1": {0: {"total_loss": 2.0, "lr": 0.01}, 9: {"total_loss": 1.0, "lr": 0.01}},
            "stage2": {0: {"total_loss": 0.9, "lr": 0.001}, 4: {"total_loss": 0.5, "lr": 0.001}}}
    P.plot_training_curves(runs, str(tmp_path / "c.png"))
    lines = _lines(figures[-1])
    assert lines["stage1: total_loss"][0].tolist() == [0, 9] and lines["stage1: total_loss"][1].tolist() == [2.0, 1.0]
    # stage 2 is drawn after stage 1 on the iteration axis
    assert lines["stage2: total_loss"][0].tolist() == [10, 14] and lines["stage2: lr"][1].tolist() == [0.001, 0.001]


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
