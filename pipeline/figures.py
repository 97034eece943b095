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
