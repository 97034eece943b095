"""The study's data: the committed per-run tables of the sweep reports
(reports/sweeps/<report>/runs.csv, written by ``python -m pipeline.commands.sweep_report``) and
the DVC pipeline's committed test predictions, and the sweep reports' per-image test
predictions (reports/sweeps/<report>/predictions.npz). Nothing here reads a tracking store, so the
page regenerates on any checkout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.guard.errors import StageError

METRIC = "test_acc_best"  # the book's table: test accuracy of the best (validation) parameters
SCHEDULES = {  # a cell's declared schedule -> runs.csv's `schedule` text (pipeline.sweeps.runs)
    "constant": "0.005 constant",
    "steps": "0.01; 0.008 from epoch 30, 0.005 from 50, 0.002 from 70",
}


def load_runs(reports_dir: Path) -> pd.DataFrame:
    """Every run of every committed sweep report, once (a run in several reports, such as
    ``<a>`` and ``<a>+<b>``, is kept from the first file by name)."""
    files = sorted((reports_dir / "sweeps").glob("*/runs.csv"))
    if not files:
        return pd.DataFrame(columns=["sweep", "run_id", "file"])
    tables = [pd.read_csv(path, keep_default_na=False, na_values=[""]).assign(
        file=f"reports/sweeps/{path.parent.name}/runs.csv") for path in files]
    runs = pd.concat(tables, ignore_index=True)
    return runs.drop_duplicates("run_id", keep="first").reset_index(drop=True)


def runs_file(sweep_id: str) -> str:
    """Where a sweep's runs are committed, as the page names it."""
    return f"reports/sweeps/{sweep_id}/runs.csv"


def cell_rows(runs: pd.DataFrame, cell) -> pd.DataFrame:
    """The finished runs of ``cell`` (study.schema.CellConfig), sorted by seed; a StageError
    if the committed schedule contradicts the declared one (the page would compare the wrong
    thing). Tables written before runs.csv had a schedule column are taken as declared."""
    if runs.empty or "kind" not in runs:
        return runs.iloc[0:0]
    mask = (runs["sweep"] == cell.sweep) & (runs["kind"] == cell.kind) & (
        runs["status"] == "FINISHED")
    if cell.hidden is not None:
        mask &= runs["hidden"] == cell.hidden
    if cell.merge is not None:
        mask &= runs["merge"] == cell.merge
    found = runs[mask].sort_values("seed").reset_index(drop=True)
    if found["seed"].duplicated().any():  # the paired analysis matches runs by seed
        raise StageError(f"findings: {runs_file(cell.sweep)}: cell '{cell.label}' has several "
                         f"runs of seed {found['seed'][found['seed'].duplicated()].iloc[0]}: "
                         "narrow the cell (hidden, merge) in study/conf/findings.yaml")
    if cell.schedule is not None and "schedule" in found and found["schedule"].notna().any():
        seen = set(found["schedule"].dropna())
        if seen != {SCHEDULES[cell.schedule]}:
            raise StageError(f"findings: {runs_file(cell.sweep)}: cell '{cell.label}' is "
                             f"declared '{cell.schedule}' ({SCHEDULES[cell.schedule]}) but "
                             f"its runs trained {sorted(seen)}")
    return found


def missing(runs: pd.DataFrame, sweep_ids) -> list[str]:
    """The files of the sweeps that have no committed runs."""
    present = set(runs["sweep"]) if len(runs) else set()
    return [f"`{runs_file(sweep_id)}`" for sweep_id in dict.fromkeys(sweep_ids)
            if sweep_id not in present]


def correct_predictions(metrics_dir: Path, kind: str) -> np.ndarray:
    """Whether the DVC pipeline's ``kind`` model (best parameters) got each test image right,
    from its committed predictions (metrics/<dataset>/predictions_<kind>_best.csv)."""
    table = pd.read_csv(metrics_dir / f"predictions_{kind}_best.csv")
    return (table["actual"] == table["predicted"]).to_numpy()


@dataclass
class Predictions:
    """A sweep report's per-image test predictions (reports/sweeps/<report>/predictions.npz,
    written by pipeline.sweeps.predictions): ``runs`` (sweep, job, run_id: one row per run, in
    the order of the matrices' rows), ``best`` and ``last`` (runs x images, predicted digits)
    and the test ``labels``."""

    runs: pd.DataFrame
    best: np.ndarray
    last: np.ndarray
    labels: np.ndarray

    def correct(self, run_ids, rule: str = "best") -> np.ndarray:
        """Whether each of ``run_ids`` (in that order) got each test image right: a boolean
        (runs x images) matrix; a StageError naming a run without predictions."""
        index = {run_id: row for row, run_id in enumerate(self.runs["run_id"])}
        absent = [run_id for run_id in run_ids if run_id not in index]
        if absent:
            raise StageError(f"findings: no test predictions for run {absent[0]} "
                             f"({len(absent)} of {len(list(run_ids))} runs)")
        matrix = {"best": self.best, "last": self.last}[rule]
        return matrix[[index[run_id] for run_id in run_ids]] == self.labels


def predictions_file(report_id: str) -> str:
    return f"reports/sweeps/{report_id}/predictions.npz"


def load_predictions(reports_dir: Path, report_id: str) -> Predictions | None:
    """A committed sweep report's predictions, or None where the report has none (sweeps
    made before jobs logged their predictions)."""
    path = reports_dir / "sweeps" / report_id / "predictions.npz"
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        found = Predictions(
            runs=pd.DataFrame({"sweep": data["sweep"].astype(str), "job": data["job"],
                               "run_id": data["run_id"].astype(str)}),
            best=data["best"], last=data["last"], labels=data["labels"])
    rows, images = len(found.runs), len(found.labels)
    if found.best.shape != (rows, images) or found.last.shape != (rows, images):
        raise StageError(f"findings: {predictions_file(report_id)}: expected {rows} x {images} "
                         f"predictions, found {found.best.shape} and {found.last.shape}")
    return found
