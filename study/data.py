"""The study's data: the committed per-run tables of the sweep reports
(reports/sweeps/<report>/runs.csv, written by ``python -m pipeline.commands.sweep_report``) and
the DVC pipeline's committed test predictions. Nothing here reads a tracking store, so the
page regenerates on any checkout."""

from __future__ import annotations

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
