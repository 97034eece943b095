"""The findings page (study/findings.py) from a tiny seed sweep through its real entry point."""

from __future__ import annotations

import pandas as pd
import pytest

from pipeline.sweeps import job as sweep
from pipeline_testkit import run_sweep, sweep_store
from study.tests.findings_command import findings_command

TINY = ("experiment=quick", "train.epochs=1", "train.train_limit=1500", "train.val_limit=300")


@pytest.fixture(scope="module")
def seeds(tmp_path_factory, prepared_dir) -> dict:
    store = sweep_store(tmp_path_factory.mktemp("findings"), prepared_dir)
    result, sweep_id, _ = run_sweep(store, store["tmp"] / "seeds", *TINY, "model=uni,bi",
                                    "train.seed=0,1")
    assert result.returncode == 0, result.stderr[-3000:]
    return {**store, "id": sweep_id}


@pytest.mark.slow  # a sweep of its own (~30 s of CPU); the page's pieces are tested fast
def test_findings_page_answers_from_the_sweeps_runs(seeds):
    # The seeds sweep (uni and bi, hidden 32 and 20 per chain) stands in for every question:
    # the claim, and accuracy against size (one size per family: bi's 2170 parameters lie
    # outside the single uni size's range, so the page says it cannot compare).
    paths = [p for p in seeds["paths"] if p.startswith(("tracking.", "paths.reports"))]
    result = findings_command(*paths, f"claim.sweeps=[{seeds['id']}]",
                              f"capacity.sweeps=[{seeds['id']}]", "merges.sweeps=[]",
                              "tuned.sweeps=[]")
    assert result.returncode == 0, result.stderr[-2000:]
    reports = seeds["tmp"] / "reports"
    page = (reports / "findings.md").read_text()
    runs = seeds["client"].search_runs(
        [e.experiment_id for e in seeds["client"].search_experiments()],
        sweep.jobs_filter(seeds["id"]))
    uni = [r.data.metrics["test_acc_best"] for r in runs if r.data.tags["model_kind"] == "uni"]
    assert f"{100 * sum(uni) / 2:.2f}% ±" in page  # the claim's table: uni's mean over seeds
    assert "neither confirm nor refute" in page or "holds" in page or "does not hold" in page
    assert "cannot compare the families at equal size" in page
    assert "*Not run yet*: bi with sum, concat, mean and mul." in page
    for figure in ("claim_per_seed.png", "accuracy_by_size.png"):
        assert (reports / "findings" / figure).read_bytes()[:4] == b"\x89PNG"
    sizes = pd.read_csv(reports / "findings" / "accuracy_by_size.csv")
    assert list(sizes["seeds"]) == [2, 2]
