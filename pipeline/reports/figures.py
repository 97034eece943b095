"""The report's figures (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import textwrap
from typing import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

# Widest figure (inches at save_png's 110 dpi: 704 px). An MLflow run page at 1440 px keeps
# its About panel in view beside description images up to about 720 px (measured in
# Chromium, MLflow 3.17); wider ones push it off the window, and MLflow drops a width attribute.
MAX_WIDTH = 6.4


def validation_curves(histories: Mapping[str, pd.DataFrame]) -> Figure:
    """Validation loss and accuracy at every checkpoint, all models on one sheet (the book's
    figure 19-23 shows them for the bidirectional net). Keys are the legend labels."""
    fig, (ax_loss, ax_acc) = plt.subplots(2, 1, figsize=(MAX_WIDTH, 6.4), sharex=True,
                                          constrained_layout=True)
    for label, history in histories.items():
        ax_loss.plot(history["iteration"], history["val_loss"], label=label)
        ax_acc.plot(history["iteration"], history["val_acc"], label=label)
    ax_loss.set(title="validation loss", ylabel="cross-entropy")
    ax_acc.set(title="validation accuracy", xlabel="iteration", ylabel="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def confusion_matrices(confusions: Mapping[str, np.ndarray], title: str) -> Figure:
    """One panel per model, one above the other (keys are the panel titles): counts, rows
    true class, columns predicted class."""
    fig, axes = plt.subplots(len(confusions), 1, figsize=(5.2, 4.8 * len(confusions)),
                             constrained_layout=True, squeeze=False)
    for ax, (label, matrix) in zip(axes[:, 0], confusions.items()):
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
    # Accuracy above loss, as wide as a run page allows. Labels wrap to their column's width
    # (8-point text, about 0.085 in a character), or stand on end when there are many columns;
    # at most three lines each (the report's tables have them whole).
    turned = len(columns) > 8
    chars = 28 if turned else max(6, int(0.85 * MAX_WIDTH / len(columns) / 0.085))
    columns = ["\n".join(wrapped for line in column.split("\n")
                         for wrapped in textwrap.wrap(line, chars, max_lines=3,
                                                      placeholder=" ..."))
               for column in columns]
    fig, axes = plt.subplots(2, 1, figsize=(MAX_WIDTH, 9.4 if turned else 7.6), sharex=True,
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
        ax.set_xticks(range(len(columns)), columns,
                      fontsize=7 if turned else 8, rotation=90 if turned else 0)
        ax.set_xlim(-0.6, len(columns) - 0.4)
        ax.set(ylabel=unit)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Per-seed test results")
    return fig
