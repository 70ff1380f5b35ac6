"""Evaluation plots for readers who look at pictures: PR, FROC, ROC, confusion matrix, piou sweep.

matplotlib's Agg backend (no display needed); every figure is titled, has labelled axes, and is
written atomically as PNG.
"""
from __future__ import annotations

import io
from typing import Dict, Mapping, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from usdet.utils.io import atomic_write_bytes  # noqa: E402

__all__ = [
    "save_figure",
    "plot_pr_curves",
    "plot_froc",
    "plot_roc_curves",
    "plot_confusion_matrix",
    "plot_piou_sweep",
]

FIGSIZE = (6.4, 4.8)
DPI = 100


def save_figure(fig, path: str) -> str:
    """Render ``fig`` to PNG in memory, write it atomically, close it; return ``path``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _empty_note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=11, color="0.3")


def plot_pr_curves(pr_curves: Mapping[str, Mapping[str, Sequence[float]]], path: str) -> str:
    """COCO precision-recall curves (IoU 0.50 solid, 0.75 dashed) per class."""
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for i, (name, c) in enumerate(pr_curves.items()):
        color = f"C{i}"
        r = np.asarray(c["recall"])
        p50 = np.asarray(c["precision_50"], dtype=float)
        ap50 = np.nanmean(p50) * 100
        ax.plot(r, p50, color=color, lw=2, label=f"{name}, IoU 0.50 (AP50 {ap50:.1f})")
        if "precision_75" in c:
            p75 = np.asarray(c["precision_75"], dtype=float)
            ax.plot(r, p75, color=color, lw=1.5, ls="--", label=f"{name}, IoU 0.75 (AP75 {np.nanmean(p75) * 100:.1f})")
    if not pr_curves:
        _empty_note(ax, "no predictions or no truth boxes")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="Recall", ylabel="Precision", title="Precision-recall (COCO, 101 points)")
    ax.grid(alpha=0.3)
    if pr_curves:
        ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_froc(
    curve_fps: Sequence[float],
    curve_sens: Sequence[float],
    rates: Sequence[float],
    sens_at_rates: Sequence[float],
    path: str,
    hit_rule: str = "",
    cpm: Optional[float] = None,
) -> str:
    """FROC curve (log FP/image axis) with the sensitivities at the standard rates marked."""
    fig, ax = plt.subplots(figsize=FIGSIZE)
    fps = np.asarray(curve_fps, dtype=float)
    sens = np.asarray(curve_sens, dtype=float)
    lo, hi = min(rates) / 2, max(rates) * 2
    if len(fps) and np.isfinite(sens).any():
        # step curve; extend to the axis ends so the reached sensitivity reads at every rate
        x = np.r_[lo, np.clip(fps, lo, None), hi]
        y = np.r_[sens[0], sens, sens[-1]]
        ax.step(x, y, where="post", lw=2, color="C0", label="FROC")
        ax.plot(rates, sens_at_rates, "o", color="C3", label=f"at standard rates (CPM {cpm:.3f})" if cpm is not None and np.isfinite(cpm) else "at standard rates")
        ax.legend(loc="lower right", fontsize=9)
    else:
        _empty_note(ax, "no truth boxes")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(rates))
    ax.set_xticklabels([f"{r:g}" for r in rates])
    ax.set(xlim=(lo, hi), ylim=(0, 1.02), xlabel="Average false positives per image", ylabel="Sensitivity (lesions found)")
    ax.set_title("FROC" + (f" (hit: {hit_rule})" if hit_rule else ""))
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_roc_curves(rocs: Mapping[str, Tuple[Sequence[float], Sequence[float], float]], path: str) -> str:
    """ROC curves ``{name: (fpr, tpr, auc)}`` with the chance diagonal."""
    fig, ax = plt.subplots(figsize=FIGSIZE)
    ax.plot([0, 1], [0, 1], ls=":", color="0.5", label="chance")
    for i, (name, (fpr, tpr, auc)) in enumerate(rocs.items()):
        ax.plot(fpr, tpr, lw=2, color=f"C{i}", label=f"{name} (AUC {auc:.3f})")
    if not rocs:
        _empty_note(ax, "ROC undefined: only one class of images")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="False positive rate (1 - specificity)", ylabel="True positive rate (sensitivity)", title="Image-level ROC")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_confusion_matrix(
    counts: Sequence[Sequence[int]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    path: str,
    title: str = "Confusion matrix",
) -> str:
    """Count matrix (rows: truth, columns: prediction) with counts and row percentages."""
    c = np.asarray(counts, dtype=float)
    fig, ax = plt.subplots(figsize=FIGSIZE)
    row_sum = c.sum(1, keepdims=True)
    frac = np.divide(c, row_sum, out=np.zeros_like(c), where=row_sum > 0)
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(c.shape[0]):
        for j in range(c.shape[1]):
            ax.text(j, i, f"{int(c[i, j])}\n({frac[i, j] * 100:.0f}%)", ha="center", va="center",
                    color="white" if frac[i, j] > 0.6 else "black", fontsize=11)
    ax.set_xticks(range(len(col_labels)))
    ax.set_xticklabels(col_labels)
    ax.set_yticks(range(len(row_labels)))
    ax.set_yticklabels(row_labels)
    ax.set(xlabel="Predicted", ylabel="Truth", title=title)
    fig.colorbar(im, ax=ax, label="fraction of truth row")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_piou_sweep(sweep: Mapping[str, Sequence[float]], score_thresh: float, score: float, path: str) -> str:
    """Penalized IoU against the score threshold, with the chosen threshold marked."""
    fig, ax = plt.subplots(figsize=FIGSIZE)
    s = np.asarray(sweep["score_thresh"], dtype=float)
    v = np.asarray([np.nan if x is None else x for x in sweep["score"]], dtype=float)
    ax.plot(s, v, "o-", lw=2, color="C0", label="penalized IoU")
    if np.isfinite(v).any():
        i = int(np.nanargmax(v))
        ax.plot([s[i]], [v[i]], "*", ms=14, color="C1", label=f"best {v[i]:.3f} at s={s[i]:.2f}")
    ax.axvline(score_thresh, ls="--", color="C3", label=f"chosen s={score_thresh:g} ({score:.3f})" if score is not None and np.isfinite(score) else f"chosen s={score_thresh:g}")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="Score threshold s", ylabel="Penalized IoU", title="Penalized IoU vs score threshold")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
