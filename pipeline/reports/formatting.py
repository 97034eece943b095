"""Wording and number formats shared by the reports, so that table 19-12 and the sweep reports
say the same thing the same way."""

from __future__ import annotations

from typing import Mapping

import pandas as pd


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and pd.isna(value))


def percent(value) -> str:
    """0.9429 -> '94.29%'."""
    return "–" if _missing(value) else f"{100 * value:.2f}%"


def points(value, signed: bool = False) -> str:
    """A difference or spread of accuracies in percentage points: 0.0069 -> '0.69'."""
    return "–" if _missing(value) else f"{100 * value:{'+' if signed else ''}.2f}"


def loss(value, digits: int = 4) -> str:
    return "–" if _missing(value) else f"{value:.{digits}f}"


DATASET_TITLES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}


def dataset_title(dataset: str) -> str:
    return DATASET_TITLES.get(dataset, dataset)


def reference_warnings(presets: list[str], dataset: str) -> str:
    """Block quotes saying when the book's numbers are only a reference point."""
    text = ""
    if presets != ["book"]:
        names = ", ".join(f"`{p}`" for p in presets)
        text += (f"\n> **Preset {names}**: not the book's configuration; its numbers are not "
                 "comparable with the book's, which are shown only as a reference point.\n")
    if dataset != "mnist":
        text += (f"\n> **Dataset `{dataset}`**: the book's numbers are for MNIST; they are "
                 "shown only as a reference point.\n")
    return text


def training_settings(params: Mapping[str, str]) -> str:
    """A training run's settings as a sentence, from its MLflow params."""
    return (f"{params['train.epochs']} epochs, batch {params['train.batch_size']}, checkpoint "
            f"every {params['train.checkpoint_every']} epoch, {params['data.train_samples']} "
            f"training / {params['data.val_samples']} validation samples, "
            f"{params['train.dtype']}")
