"""The report's figures (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from typing import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

def validation_curves(histories: Mapping[str, pd.DataFrame]) -> Figure:
    """Validation loss and accuracy at every checkpoint, all models on one sheet (the book's
    figure 19-23 shows them for the bidirectional net). Keys are the legend labels."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for label, history in histories.items():
        ax_loss.plot(history["iteration"], history["val_loss"], label=label)
        ax_acc.plot(history["iteration"], history["val_acc"], label=label)
    ax_loss.set(title="validation loss", xlabel="iteration", ylabel="cross-entropy")
    ax_acc.set(title="validation accuracy", xlabel="iteration", ylabel="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def confusion_matrices(confusions: Mapping[str, np.ndarray], title: str) -> Figure:
    """One panel per model (keys are the panel titles): counts, rows true class, columns
    predicted class."""
    fig, axes = plt.subplots(1, len(confusions), figsize=(5.2 * len(confusions), 4.8),
                             constrained_layout=True, squeeze=False)
    for ax, (label, matrix) in zip(axes[0], confusions.items()):
        matrix = np.asarray(matrix)
        ax.imshow(matrix, cmap="Blues")
        classes = np.arange(matrix.shape[0])
        ax.set(xticks=classes, yticks=classes, xlabel="predicted", ylabel="true",
               title=label)
        threshold = matrix.max() / 2
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                    color="white" if count > threshold else "black")
    fig.suptitle(title)
    return fig


def save_png(fig: Figure, path) -> None:
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def per_seed(jobs: pd.DataFrame, configurations: list[str], book: Mapping[str, dict]) -> Figure:
    """Test accuracy and loss of every finished job, one column per configuration (filled:
    best parameters, hollow: last; a bar at the mean of the best), then the book's single
    runs for each model kind present (``book``: kind -> {"best": {"accuracy", "loss"},
    "last": {...}}), so the spread over seeds sits next to the one number the book printed."""
    columns = list(configurations) + [f"book {kind}\n(one run)" for kind in book]
    fig, axes = plt.subplots(1, 2, figsize=(max(9.0, 3.0 + 2.2 * len(columns)), 4.4),
                             constrained_layout=True)
    jitter = np.random.default_rng(0)  # fixed: the figure is reproducible
    for ax, (what, scale, unit) in zip(axes, (("acc", 100.0, "test accuracy (%)"),
                                              ("loss", 1.0, "test loss (cross-entropy)"))):
        for x, label in enumerate(configurations):
            group = jobs[jobs["configuration"] == label]
            for rule, offset, face in (("best", -0.12, "C0"), ("last", 0.12, "none")):
                values = scale * group[f"test_{what}_{rule}"].to_numpy()
                ax.scatter(x + offset + jitter.uniform(-0.05, 0.05, len(values)), values,
                           s=28, facecolors=face, edgecolors="C0", zorder=3,
                           label=f"our seeds, {rule} parameters" if x == 0 else None)
            mean = scale * group[f"test_{what}_best"].mean()
            ax.hlines(mean, x - 0.3, x + 0.06, colors="C0", linewidth=2, zorder=2,
                      label="mean, best parameters" if x == 0 else None)
        for i, (kind, result) in enumerate(book.items()):
            x = len(configurations) + i
            key = "accuracy" if what == "acc" else "loss"
            for rule, offset, face in (("best", -0.12, "C3"), ("last", 0.12, "none")):
                ax.scatter(x + offset, scale * result[rule][key], marker="*", s=110,
                           facecolors=face, edgecolors="C3", zorder=3,
                           label=f"book, {rule} parameters" if i == 0 else None)
        ax.set_xticks(range(len(columns)), columns)
        ax.set_xlim(-0.6, len(columns) - 0.4)
        ax.set(ylabel=unit)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("Per-seed test results")
    return fig


def accuracy_by_size(sizes: pd.DataFrame, book: Mapping[str, tuple[int, float]]) -> Figure:
    """Mean test accuracy (best parameters) against parameter count, one line per model
    family with its seed range as a band, and the book's single runs as stars (``book``:
    label -> (parameter count, accuracy))."""
    fig, ax = plt.subplots(figsize=(7.5, 4.6), constrained_layout=True)
    for i, (family, group) in enumerate(sizes.groupby("family", sort=False)):
        group = group.sort_values("param_count")
        color = f"C{i}"
        ax.plot(group["param_count"], 100 * group["mean"], "o-", color=color,
                label=f"{family}, mean over seeds")
        ax.fill_between(group["param_count"], 100 * group["min"], 100 * group["max"],
                        color=color, alpha=0.15, label=f"{family}, min-max over seeds")
        for row in group.itertuples():
            ax.annotate(f"{row.hidden}", (row.param_count, 100 * row.mean), fontsize=7,
                        textcoords="offset points", xytext=(4, -10), color=color)
    for label, (count, accuracy) in book.items():
        ax.scatter(count, 100 * accuracy, marker="*", s=140, color="C3", zorder=4)
        ax.annotate(label, (count, 100 * accuracy), fontsize=8, textcoords="offset points",
                    xytext=(6, 4), color="C3")
    ax.set_xscale("log")
    ax.set(xlabel="parameters (log scale); labels: hidden units per chain",
           ylabel="test accuracy, best parameters (%)",
           title="Accuracy against parameter count")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    return fig
