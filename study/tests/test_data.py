"""The study's reading of a sweep report's per-image test predictions (predictions.npz),
written by the sweep report's own writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.guard.errors import StageError
from pipeline.sweeps import predictions
from study import data


def report_arrays(rng) -> dict:
    labels = rng.integers(0, 10, 50).astype(np.uint8)
    best = np.tile(labels, (3, 1))
    best[0, :5] = (labels[:5] + 1) % 10  # run a misses the first five images
    best[2, 10:12] = (labels[10:12] + 3) % 10  # run c misses two others
    return {"sweep": np.array(["s", "s", "t"]), "job": np.array([0, 1, 0], dtype=np.int32),
            "run_id": np.array(["a", "b", "c"]), "best": best, "last": best[::-1].copy(),
            "labels": labels}


def test_the_study_reads_the_reports_predictions_by_run(tmp_path):
    arrays = report_arrays(np.random.default_rng(0))
    folder = tmp_path / "sweeps" / "s+t"
    folder.mkdir(parents=True)
    predictions.write_report_file(folder, arrays)
    found = data.load_predictions(tmp_path, "s+t")
    assert list(found.runs["run_id"]) == ["a", "b", "c"] and list(found.runs["job"]) == [0, 1, 0]
    assert found.best.dtype == np.uint8 and found.labels.dtype == np.uint8
    correct = found.correct(["c", "a"])  # in the order asked for
    assert correct.shape == (2, 50)
    assert list(correct.sum(axis=1)) == [48, 45]
    assert list(found.correct(["a"], rule="last").sum(axis=1)) == [48]
    with pytest.raises(StageError, match="no test predictions for run z"):
        found.correct(["a", "z"])


def test_a_report_without_predictions_reads_as_none(tmp_path):
    assert data.load_predictions(tmp_path, "book-seeds-20-2") is None


def test_the_committed_reports_predictions_match_their_runs_accuracy():
    # Every committed predictions.npz: one row per run of its runs.csv that has predictions,
    # and each row's accuracy is the run's test_acc_best and test_acc_last.
    reports = Path(__file__).resolve().parents[2] / "reports"
    for path in sorted((reports / "sweeps").glob("*/predictions.npz")):
        found = data.load_predictions(reports, path.parent.name)
        runs = pd.read_csv(path.parent / "runs.csv").set_index("run_id")
        for rule in ("best", "last"):
            accuracy = found.correct(list(found.runs["run_id"]), rule).mean(axis=1)
            expected = runs.loc[list(found.runs["run_id"]), f"test_acc_{rule}"].to_numpy()
            assert accuracy == pytest.approx(expected, abs=1e-12), path
