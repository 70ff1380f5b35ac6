"""Evaluation plots for readers who look at pictures: PR, FROC, ROC, confusion matrix, piou sweep.

matplotlib's Agg backend (no display needed); every figure is titled, has labelled axes, and is
written atomically as PNG.
"""
from __future__ import annotations

import io
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

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
    "read_event_metrics",
    "plot_training_curves",
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
        ax.legend(loc="best", fontsize=8)
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
    extended: Optional[Sequence[bool]] = None,
) -> str:
    """FROC curve (log FP/image axis) with the sensitivities at the standard rates marked.

    Beyond the last detection the curve's end value is carried on (usdet.evaluation.froc): drawn
    dashed, and the ``extended`` rates' markers hollow, so the carried part is not read as measured.
    """
    fig, ax = plt.subplots(figsize=FIGSIZE)
    fps = np.asarray(curve_fps, dtype=float)
    sens = np.asarray(curve_sens, dtype=float)
    at = np.asarray([np.nan if v is None else v for v in sens_at_rates], dtype=float)
    ext = np.zeros(len(at), bool) if extended is None else np.asarray(extended, dtype=bool)
    lo, hi = min(rates) / 2, max(rates) * 2
    if len(fps) and np.isfinite(sens).any():
        # every lesion found: sensitivity 1 cannot rise, the curve runs on; else it is dashed past the end
        end = hi if sens[-1] >= 1.0 else max(fps[-1], lo)
        x = np.r_[lo, np.clip(fps, lo, None), end]
        y = np.r_[sens[0], sens, sens[-1]]
        ax.step(x, y, where="post", lw=2, color="C0", label="FROC")
        if end < hi:
            ax.plot([end, hi], [sens[-1], sens[-1]], ls="--", lw=1.5, color="C0",
                    label="extended: no more detections, last value carried")
        ok = np.isfinite(at)
        label = f"at standard rates (CPM {cpm:.3f})" if cpm is not None and np.isfinite(cpm) else "at standard rates"
        r = np.asarray(rates, dtype=float)
        ax.plot(r[ok & ~ext], at[ok & ~ext], "o", color="C3", label=label)
        if (ok & ext).any():
            ax.plot(r[ok & ext], at[ok & ext], "o", mfc="none", color="C3", label="extended rates (end value carried)")
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


# --------------------------------------------------------------------------------------------
# Training curves from detectron2's event file (OUTPUT_DIR/metrics.json)
# --------------------------------------------------------------------------------------------
def read_event_metrics(path: str) -> Tuple[Dict[int, Dict[str, float]], List[str]]:
    """Read detectron2's ``metrics.json`` (one JSON object per line) into ``{iteration: {key: value}}``.

    A run killed mid-write leaves a partial last line, and a resumed run logs some iterations
    again: unreadable lines are skipped with a message, and the latest value of a key wins.
    """
    import json
    import os

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: metrics file not found")
    records: Dict[int, Dict[str, float]] = {}
    problems: List[str] = []
    with open(path, "r", encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                problems.append(f"{path}:{lineno}: not a complete JSON line (skipped)")
                continue
            if not isinstance(rec, dict) or "iteration" not in rec:
                problems.append(f"{path}:{lineno}: no 'iteration' (skipped)")
                continue
            it = int(rec["iteration"])
            slot = records.setdefault(it, {})
            for k, v in rec.items():
                if k == "iteration" or isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                slot[k] = float(v)
    return dict(sorted(records.items())), problems


_TIMING_KEYS = ("time", "data_time", "eta_seconds")
_TRAINING_PREFIXES = ("fast_rcnn", "roi_head", "rpn")


def training_curve_panels(keys: Sequence[str], everything: bool = False) -> List[Tuple[str, List[str]]]:
    """Group event keys into panels: each loss (with its validation twin), LR, eval metrics by prefix.

    ``everything`` keeps every key of a group (else: AP/AP50/AP75, piou score, accuracies).
    """
    keys = [k for k in keys if k not in _TIMING_KEYS and not k.startswith("rank_data_time")]
    panels: List[Tuple[str, List[str]]] = []
    losses = sorted(k for k in keys if "loss" in k and "/" not in k and not k.startswith("val"))
    if "total_loss" in losses:
        losses.remove("total_loss")
        losses.insert(0, "total_loss")
    val = {k for k in keys if k.startswith("val") and "loss" in k and "/" not in k}
    for k in losses:
        # the validation counterpart of a training loss goes on the same panel
        twins = ["val_loss", "val_total_loss"] if k == "total_loss" else [f"val_{k}"]
        pair = [t for t in twins if t in val][:1]
        val -= set(pair)
        panels.append((k + (" (train, validation)" if pair else ""), [k] + pair))
    if val:
        panels.append(("validation loss", sorted(val)))
    if "lr" in keys:
        panels.append(("learning rate", ["lr"]))
    groups: Dict[str, List[str]] = {}
    for k in keys:
        if "/" in k:
            groups.setdefault(k.split("/", 1)[0], []).append(k)
    for prefix, ks in sorted(groups.items()):
        ks = sorted(ks)
        if prefix in _TRAINING_PREFIXES:
            # detectron2's per-iteration training statistics: accuracies are worth a panel,
            # sample counts only when asked for (``everything``)
            if not everything:
                ks = [k for k in ks if "accuracy" in k]
            if ks:
                panels.append((f"{prefix} (training)", ks))
            continue
        if prefix == "bbox" and not everything:
            ks = [k for k in ks if k.split("/", 1)[1] in ("AP", "AP50", "AP75")] or ks
        elif prefix == "piou" and not everything:
            ks = [k for k in ks if k.split("/", 1)[1] in ("score", "best_score")] or ks
        panels.append((f"{prefix} (evaluation)", ks))
    return panels


def plot_training_curves(
    runs: Mapping[str, Mapping[int, Mapping[str, float]]],
    path: str,
    sequential: bool = True,
    keys: Optional[Sequence[str]] = None,
) -> str:
    """One figure of training curves for one or several runs (e.g. stage 1 then stage 2).

    ``sequential`` draws each run after the previous one on the iteration axis (stage 2 starts
    at iteration 0 on its own schedule), with a dashed line at each boundary; otherwise runs are
    overlaid from 0.
    """
    all_keys = sorted({k for recs in runs.values() for r in recs.values() for k in r})
    if keys:
        all_keys = [k for k in all_keys if k in set(keys) or any(k.startswith(x) for x in keys)]
    panels = training_curve_panels(all_keys, everything=bool(keys))

    def finite(k: str) -> bool:
        return any(k in r and np.isfinite(r[k]) for recs in runs.values() for r in recs.values())

    panels = [(t, [k for k in ks if finite(k)]) for t, ks in panels]
    panels = [(t, ks) for t, ks in panels if ks]  # e.g. AP is NaN before the model detects anything
    if not panels:
        raise ValueError("no plottable keys (losses, lr, evaluation metrics) in the metrics file(s)")
    ncol = min(3, len(panels))
    nrow = int(np.ceil(len(panels) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.0 * ncol, 3.4 * nrow), squeeze=False)
    offsets: Dict[str, int] = {}
    off = 0
    for name, recs in runs.items():
        offsets[name] = off if sequential else 0
        if sequential and recs:
            off += max(recs) + 1
    for ax, (title, ks) in zip(axes.ravel(), panels):
        for ri, (run, recs) in enumerate(runs.items()):
            for ki, k in enumerate(ks):
                pts = [(it + offsets[run], r[k]) for it, r in recs.items() if k in r and np.isfinite(r[k])]
                if not pts:
                    continue
                x, y = zip(*pts)
                label = (f"{run}: " if len(runs) > 1 else "") + k
                style = "-" if ki == 0 else ["--", ":", "-."][(ki - 1) % 3]
                marker = "o" if len(pts) < 30 else None
                ax.plot(x, y, style, color=f"C{ri}" if len(ks) == 1 else f"C{(ri * len(ks) + ki) % 10}",
                        lw=1.5, marker=marker, ms=3, label=label)
        if sequential and len(runs) > 1:
            for run in list(runs)[1:]:
                ax.axvline(offsets[run], ls="--", color="0.5", lw=1)
        if title == "learning rate" or ("loss" in title and all(
                min((r[k] for recs in runs.values() for r in recs.values() if k in r), default=1) > 0 for k in ks)):
            if title == "learning rate":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
            else:
                ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("iteration" + (" (runs in sequence)" if sequential and len(runs) > 1 else ""))
        ax.set_ylabel(ks[0] if len(ks) == 1 else "value")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0] and (len(ks) > 1 or len(runs) > 1):
            ax.legend(fontsize=7)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    fig.suptitle("Training curves: " + ", ".join(runs), fontsize=12)
    fig.tight_layout()
    return save_figure(fig, path)
