"""Study v3's pre-registered analysis (study/conf/preregistration.yaml) from committed files
alone: each cell's runs from its sweep report's runs.csv, their per-image correctness from the
report's predictions.npz, then the registered bootstrap, Holm and verdicts (study.bootstrap).

    PYTHONPATH=. python -m study.preregistered     # prints both families' verdicts so far

Not the page yet: the next version of study.findings writes these into reports/findings.md.
A cell whose report is not committed yet, or whose runs are not all pinned and with
predictions, is missing; its comparisons count as p = 1 (the registered policy).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from study import bootstrap, data

ROOT = Path(__file__).resolve().parent.parent
REGISTRATION = ROOT / "study" / "conf" / "preregistration.yaml"


def seed_range(text: str) -> list[int]:
    """'0-19' -> [0, ..., 19]."""
    first, last = (int(part) for part in str(text).split("-"))
    return list(range(first, last + 1))


@dataclass
class Cell:
    label: str
    sweep: str
    kind: str
    hidden: int
    seeds: list[int]
    merge: str | None = None
    schedule: str | None = None
    epochs: int = 100
    correct: np.ndarray | None = None  # runs x images, in seed order
    problems: list[str] = field(default_factory=list)


def cell_runs(runs: pd.DataFrame, cell: Cell) -> pd.DataFrame:
    """The cell's finished runs (declared seeds only), one per seed, sorted by seed."""
    if runs.empty:
        return runs
    mask = ((runs["sweep"] == cell.sweep) & (runs["kind"] == cell.kind)
            & (runs["hidden"] == cell.hidden) & (runs["status"] == "FINISHED")
            & runs["seed"].isin(cell.seeds))
    if cell.merge is not None:
        mask &= runs["merge"] == cell.merge
    if cell.schedule is not None:
        mask &= runs["schedule"] == data.SCHEDULES[cell.schedule]
    if "epochs" in runs:
        mask &= runs["epochs"] == cell.epochs
    return runs[mask].sort_values("seed").drop_duplicates("seed").reset_index(drop=True)


def load_cells(registration: dict, reports_dir: Path) -> dict[str, Cell]:
    """Every registered cell with its correctness matrix where its runs are all there: the
    declared seeds finished, each pinned, each with predictions."""
    runs = data.load_runs(reports_dir)
    cells = {}
    for entry in registration["cells"]:
        cell = Cell(label=entry["label"], sweep=entry["sweep"], kind=entry["kind"],
                    hidden=int(entry["hidden"]), seeds=seed_range(entry["seeds"]),
                    merge=entry.get("merge"), schedule=entry.get("schedule"),
                    epochs=int(entry.get("epochs", 100)))
        cells[cell.label] = cell
        found = cell_runs(runs, cell)
        if len(found) < len(cell.seeds):
            cell.problems.append(f"{len(found)} of {len(cell.seeds)} seeds committed")
            continue
        if "numerics" not in found or (found["numerics"] != "pinned").any():
            cell.problems.append("not every run is pinned")
            continue
        predictions = data.load_predictions(reports_dir, cell.sweep)
        if predictions is None:
            cell.problems.append(f"no {data.predictions_file(cell.sweep)}")
            continue
        cell.correct = predictions.correct(list(found["run_id"]))
    return cells


def analyse_family(family: list[dict], cells: dict[str, Cell], resamples: int, seed: int
                   ) -> list[tuple[dict, bootstrap.Comparison]]:
    """One family's comparisons, Holm-adjusted together."""
    ready = {c["id"]: c for c in family
             if all(cells[label].correct is not None for label in c["contrast"])}
    point, values = {}, {}
    if ready:
        used = {label: cells[label].correct for label in cells
                if cells[label].correct is not None
                and any(label in c["contrast"] for c in ready.values())}
        point, values = bootstrap.resampled_contrasts(
            used, {i: c["contrast"] for i, c in ready.items()}, resamples, seed)
    all_points = {c["id"]: point.get(c["id"], np.nan) for c in family}
    found = bootstrap.holm_family(all_points, {c["id"]: values.get(c["id"]) for c in family})
    return list(zip(family, found))


def line(entry: dict, comparison: bootstrap.Comparison, cells: dict[str, Cell]) -> str:
    if np.isnan(comparison.value):
        missing = sorted({f"{label} ({'; '.join(cells[label].problems)})"
                          for label in entry["contrast"] if cells[label].correct is None})
        return f"{entry['id']} {entry['name']}: no data yet: {', '.join(missing)}"
    words = tuple(entry["words"])
    return (f"{entry['id']} {entry['name']}: {100 * comparison.value:+.2f} points, "
            f"{100 * comparison.level:.2f}% interval {100 * comparison.low:+.2f} to "
            f"{100 * comparison.high:+.2f} (Holm rank {comparison.rank}, bootstrap p "
            f"{comparison.p:.4f}): {bootstrap.verdict(comparison, words)}; detectable with 80% "
            f"power: {100 * comparison.detectable:.2f} points")


def main(reports_dir: Path = ROOT / "reports") -> int:
    registration = yaml.safe_load(REGISTRATION.read_text(encoding="utf-8"))
    cells = load_cells(registration, reports_dir)
    resamples = int(registration["test"]["resamples"])
    for name in ("primary_family", "secondary_family"):
        print(f"{name}:")
        for entry, comparison in analyse_family(registration[name], cells, resamples,
                                                bootstrap.SEED):
            print("  " + line(entry, comparison, cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
