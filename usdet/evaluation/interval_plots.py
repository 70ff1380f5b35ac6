"""One plot of estimates with 95% intervals, shared by the comparison, subgroup, cross-dataset and
cross-validation reports: a panel per metric, a row per label, a colour per series."""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

#: (row label, series name, estimate, low, high); NaN where undefined.
Row = Tuple[str, str, float, float, float]

__all__ = ["Row", "plot_intervals"]


def plot_intervals(
    panels: Mapping[str, Sequence[Row]],
    path: str,
    title: str,
    reference: Optional[float] = None,
) -> str:
    """Horizontal interval plot: one panel per key of ``panels``; ``reference`` draws a vertical line."""
    from . import plots as P

    plt = P.plt
    n = max(len(panels), 1)
    labels_all: List[str] = []
    for rows in panels.values():
        for r in rows:
            if r[0] not in labels_all:
                labels_all.append(r[0])
    height = 1.2 + 0.35 * max(len(labels_all), 1) * max(1, len({r[1] for rows in panels.values() for r in rows}) ** 0.5)
    fig, axes = plt.subplots(1, n, figsize=(max(6.4, 3.2 * n), max(2.6, height)), squeeze=False, sharey=True)
    series: Dict[str, int] = {}
    for rows in panels.values():
        for r in rows:
            series.setdefault(r[1], len(series))
    k = max(len(series), 1)
    offs = (np.arange(k) - (k - 1) / 2) * (0.6 / k)
    for ax, (name, rows) in zip(axes[0], panels.items()):
        for label, s, est, low, high in rows:
            y = labels_all.index(label) + offs[series[s]]
            if est is None or not np.isfinite(est):
                continue
            lo = est if low is None or not np.isfinite(low) else low
            hi = est if high is None or not np.isfinite(high) else high
            ax.errorbar([est], [y], xerr=[[est - lo], [hi - est]], fmt="o", color=f"C{series[s]}", capsize=3,
                        label=s if s not in ax.get_legend_handles_labels()[1] else None)
        if reference is not None:
            ax.axvline(reference, color="0.5", lw=1, ls="--")
        ax.set_title(name)
        ax.grid(True, axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(labels_all)))
    axes[0][0].set_yticklabels(labels_all)
    axes[0][0].invert_yaxis()
    if len(series) > 1:
        handles, names = [], []
        for ax in axes[0]:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in names:
                    handles.append(h)
                    names.append(lab)
        fig.legend(handles, names, loc="lower center", ncol=min(len(names), 4), fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08 if len(series) > 1 else 0, 1, 0.95))
    return P.save_figure(fig, path)
