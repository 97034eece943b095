"""The pre-registered analysis reads cells from committed runs.csv and predictions.npz files,
uses only pinned runs of the declared seeds, and counts a missing cell's comparisons as p = 1."""

from __future__ import annotations

import numpy as np
import pandas as pd
import yaml

from pipeline.sweeps import predictions
from study import data, preregistered

SCHEDULE = {"constant": data.SCHEDULES["constant"], "steps": data.SCHEDULES["steps"]}


def write_sweep(reports, sweep, cells, labels, rng, numerics="pinned"):
    """cells: (kind, hidden, merge, schedule, accuracy) per configuration, seeds 0-3."""
    rows, best = [], []
    for kind, hidden, merge, schedule, accuracy in cells:
        for seed in range(4):
            guess = np.where(rng.random(len(labels)) < accuracy, labels, (labels + 1) % 10)
            run_id = f"{sweep}-{kind}{hidden}-{schedule}-{seed}"
            rows.append({"sweep": sweep, "job": len(rows), "kind": kind, "seed": seed,
                         "status": "FINISHED", "hidden": hidden, "merge": merge,
                         "schedule": SCHEDULE[schedule], "epochs": 100,
                         "test_acc_best": float((guess == labels).mean()),
                         "test_acc_last": float((guess == labels).mean()),
                         "run_id": run_id, "numerics": numerics})
            best.append(guess)
    folder = reports / "sweeps" / sweep
    folder.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(folder / "runs.csv", index=False)
    best = np.array(best, dtype=np.uint8)
    predictions.write_report_file(folder, {
        "sweep": np.array([r["sweep"] for r in rows]), "job": np.arange(len(rows)),
        "run_id": np.array([r["run_id"] for r in rows]), "best": best, "last": best,
        "labels": labels.astype(np.uint8)})


REGISTRATION = yaml.safe_load("""
cells:
  - {label: uni constant, sweep: book, kind: uni, hidden: 32, schedule: constant, seeds: "0-3"}
  - {label: bi steps, sweep: book, kind: bi, hidden: 20, merge: sum, schedule: steps, seeds: "0-3"}
  - {label: uni steps, sweep: uni-steps, kind: uni, hidden: 32, schedule: steps, seeds: "0-3"}
  - {label: bi constant, sweep: bi-constant, kind: bi, hidden: 20, merge: sum, schedule: constant, seeds: "0-3"}
family:
  - {id: P1, name: architecture, contrast: {bi constant: 0.5, bi steps: 0.5, uni constant: -0.5, uni steps: -0.5}, words: [bi better, uni better]}
  - {id: P3, name: constant, contrast: {bi constant: 1, uni constant: -1}, words: [bi better, uni better]}
  - {id: P4, name: steps, contrast: {bi steps: 1, uni steps: -1}, words: [bi better, uni better]}
""")


def test_cells_from_committed_files_and_missing_cells_count_as_p_1(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 3000)
    write_sweep(tmp_path, "book", [("uni", 32, "", "constant", 0.90),
                                   ("bi", 20, "sum", "steps", 0.97)], labels, rng)
    write_sweep(tmp_path, "uni-steps", [("uni", 32, "", "steps", 0.92)], labels, rng)
    cells = preregistered.load_cells(REGISTRATION, tmp_path)
    assert cells["uni constant"].correct.shape == (4, 3000)
    assert cells["bi constant"].correct is None
    assert cells["bi constant"].problems == ["0 of 4 seeds committed"]
    found = {e["id"]: c for e, c in preregistered.analyse_family(
        REGISTRATION["family"], cells, 500, 25)}
    assert found["P1"].p == 1.0 and np.isnan(found["P1"].value)
    assert found["P4"].value > 0.04 and found["P4"].rejected and found["P4"].low > 0
    # m = 3 counts the missing comparisons: P4 is tested at 0.05 / 3 first
    assert found["P4"].rank == 1 and abs(found["P4"].level - (1 - 0.05 / 3)) < 1e-12


def test_a_cell_with_an_unpinned_run_is_not_used(tmp_path):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, 500)
    write_sweep(tmp_path, "book", [("uni", 32, "", "constant", 0.90),
                                   ("bi", 20, "sum", "steps", 0.97)], labels, rng,
                numerics="native")
    cells = preregistered.load_cells(REGISTRATION, tmp_path)
    assert cells["uni constant"].correct is None
    assert cells["uni constant"].problems == ["not every run is pinned"]
