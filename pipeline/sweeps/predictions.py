"""Per-image test predictions: what a sweep job logs, and what the sweep report commits.

A job that tests its own model (``test_after_training``) logs the digit each test image was
given by its best and by its last parameters, with the true digits, as the run artifact
``evaluation/test_predictions.npz`` (uint8 arrays ``best``, ``last``, ``labels``; about 10 kB
compressed). The sweep report gathers them from MLflow into
``reports/sweeps/<id>/predictions.npz``: one row per finished run that logged them, keyed by
``sweep``, ``job`` and ``run_id`` (in runs.csv's order), the matrices ``best`` and ``last``
(runs x images, uint8) and the test labels once. The study reads that file
(``study.data.load_predictions``) for the test set's own uncertainty: a bootstrap over seeds
and test images, McNemar on sweep seeds.
"""

from __future__ import annotations

import io
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.guard.errors import StageError

log = logging.getLogger(__name__)

ARTIFACT = "evaluation/test_predictions.npz"  # a job run's artifact
REPORT_FILE = "predictions.npz"  # in reports/sweeps/<id>/
RULES = ("best", "last")


def _digits(values, what: str) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim != 1 or (values.size and (values.min() < 0 or values.max() > 255)):
        raise StageError(f"{what}: expected one class index (0-255) per test image")
    return values.astype(np.uint8)


def job_arrays(results: Mapping, labels) -> dict[str, np.ndarray]:
    """The artifact's arrays from scoring.score's results (rule -> Evaluation) and the labels."""
    arrays = {rule: _digits(results[rule].predictions, f"{rule} predictions") for rule in RULES}
    arrays["labels"] = _digits(labels, "test labels")
    if any(len(a) != len(arrays["labels"]) for a in arrays.values()):
        raise StageError("test predictions: not one per test image")
    return arrays


def encode(arrays: Mapping[str, np.ndarray]) -> bytes:
    """A compressed .npz; the same arrays give the same bytes (numpy writes every member
    with zipfile's fixed default timestamp)."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{k: np.ascontiguousarray(v) for k, v in arrays.items()})
    return buffer.getvalue()


def log_job_predictions(client, run_id: str, results: Mapping, labels) -> None:
    """Log a tested job's per-image predictions as the run's ``evaluation/test_predictions.npz``."""
    data = encode(job_arrays(results, labels))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / Path(ARTIFACT).name
        path.write_bytes(data)
        client.log_artifact(run_id, str(path), str(Path(ARTIFACT).parent))


def read_job_predictions(client, run_id: str) -> dict[str, np.ndarray] | None:
    """A run's logged predictions, or None if it has none (runs made before jobs logged them)."""
    folder = str(Path(ARTIFACT).parent)
    if ARTIFACT not in {a.path for a in client.list_artifacts(run_id, folder)}:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run_id, ARTIFACT, tmp)
        with np.load(local, allow_pickle=False) as data:
            return {key: data[key] for key in (*RULES, "labels")}


def gather(client, jobs: pd.DataFrame) -> dict[str, np.ndarray] | None:
    """The report file's arrays for the finished runs of ``jobs`` (runs.csv's table) that
    logged predictions; None if none did. A StageError if two runs were tested on different
    labels (the report is of one test set)."""
    keys, rows, labels = [], {rule: [] for rule in RULES}, None
    for _, job in jobs[jobs["status"] == "FINISHED"].iterrows():
        found = read_job_predictions(client, job["run_id"])
        if found is None:
            continue
        if labels is None:
            labels = found["labels"]
        elif not np.array_equal(labels, found["labels"]):
            raise StageError(f"run {job['run_id']} (sweep {job['sweep']}, job {job['job']}): "
                             "its test labels differ from the other runs': one report is of "
                             "one test set")
        keys.append((job["sweep"], int(job["job"]), job["run_id"]))
        for rule in RULES:
            rows[rule].append(found[rule])
    if labels is None:
        return None
    missing = int((jobs["status"] == "FINISHED").sum()) - len(keys)
    if missing:
        log.info("%d finished runs logged no test predictions (made before jobs logged them)",
                 missing)
    sweeps, job_numbers, run_ids = zip(*keys)
    return {"sweep": np.array(sweeps, dtype=str), "job": np.array(job_numbers, dtype=np.int32),
            "run_id": np.array(run_ids, dtype=str),
            **{rule: np.stack(rows[rule]).astype(np.uint8) for rule in RULES},
            "labels": labels.astype(np.uint8)}


def write_report_file(folder: Path, arrays: Mapping[str, np.ndarray] | None) -> None:
    """``folder/predictions.npz``, if any run logged predictions."""
    if arrays is not None:
        (folder / REPORT_FILE).write_bytes(encode(arrays))
