"""The study's figures: per-seed results of a section's cells, and accuracy by parameter count
at the range where the claim lives."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import stats

from pipeline.reports import figures
from pipeline.reports.formatting import dataset_title

FLOOR, CEILING = 90.0, 100.0  # the by-size figure's accuracy range (%)


def per_seed(cells: Mapping[str, pd.DataFrame], book: Mapping[str, dict], dataset: str) -> Figure:
    """Every finished run of every cell (label -> its runs), then the book's single runs."""
    jobs = pd.concat([rows.assign(configuration=label) for label, rows in cells.items()],
                     ignore_index=True)
    fig = figures.per_seed(jobs, list(cells), book)  # (it wraps long labels)
    fig.suptitle(f"Per-seed test results, {dataset_title(dataset)}")
    return fig


def accuracy_by_size(cells: Mapping[str, pd.DataFrame], book: Mapping[str, tuple[int, float]],
                     dataset: str, confidence: float) -> Figure:
    """Mean test accuracy (best parameters) of each cell against its parameter count, one
    line per model kind, with t intervals over seeds; the book's single runs as stars
    (label -> (parameter count, accuracy)). Means below the range sit on its floor as open
    triangles, their value written beside them."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6), constrained_layout=True)
    for i, kind in enumerate(("uni", "bi")):
        points = []
        for label, rows in cells.items():
            if rows.empty or rows["kind"].iloc[0] != kind:
                continue
            values = 100 * rows["test_acc_best"].to_numpy()
            half = (stats.t.ppf((1 + confidence) / 2, len(values) - 1)
                    * values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
            points.append((int(rows["param_count"].iloc[0]), values.mean(), half))
        if not points:
            continue
        points.sort()
        count, mean, half = (np.array(column) for column in zip(*points))
        color = f"C{i}"
        shown = np.clip(mean, FLOOR, None)
        ax.plot(count, shown, "-", color=color, alpha=0.6)
        inside = mean >= FLOOR
        ax.errorbar(count[inside], mean[inside], yerr=half[inside], fmt="o", color=color,
                    capsize=3, label=f"{kind}: mean over seeds, {100 * confidence:g}% interval")
        if (~inside).any():
            ax.scatter(count[~inside], np.full((~inside).sum(), FLOOR), marker="v", s=60,
                       facecolors="none", edgecolors=color, zorder=4,
                       label=f"{kind}: mean below {FLOOR:g}%")
            for x, value in zip(count[~inside], mean[~inside]):
                ax.annotate(f"{value:.1f}%", (x, FLOOR), textcoords="offset points",
                            xytext=(6, 4), fontsize=7, color=color)
    for i, (label, (count, accuracy)) in enumerate(book.items()):
        ax.scatter(count, 100 * accuracy, marker="*", s=160, color=f"C{i}", edgecolors="C3",
                   zorder=5, label=f"{label} (one run)")
    ax.set_ylim(FLOOR - 0.3, CEILING)
    ax.set(xlabel="parameters", ylabel="test accuracy, best parameters (%)",
           title=f"Accuracy against parameter count, {dataset_title(dataset)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return fig
