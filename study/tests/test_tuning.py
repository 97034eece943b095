"""The findings page's tuned section (study/tuning.py) built from a real search, its best
trial retrained and a book sweep, all tiny and in a temporary store (slow)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from pipeline.errors import StageError
from pipeline.sweeps import job as sweep
from pipeline_testkit import error_lines, run_sweep, sweep_store
from study import tuning
from study.tests.findings_command import findings_command

TINY = ("train.epochs=10", "train.train_limit=500", "train.val_limit=200",
        "tracking.flush_every_seconds=0")
# Optuna 2 imports its SQL storage with a SQLAlchemy 1 idiom (unused here: storage is null).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:optuna.*")


@pytest.fixture(scope="module")
def store(tmp_path_factory, prepared_dir) -> dict:
    return sweep_store(tmp_path_factory.mktemp("tuning"), prepared_dir)


def sweep_of(store: dict, name: str, *overrides: str):
    return run_sweep(store, store["tmp"] / "multirun" / name, *TINY, *overrides)


def runs_of(client, sweep_id: str) -> dict:
    return {int(run.data.tags[sweep.JOB_TAG]): run
            for run in client.search_runs([e.experiment_id for e in client.search_experiments()],
                                          sweep.jobs_filter(sweep_id))}


@pytest.fixture(scope="module")
def search(store) -> dict:
    result, sweep_id, sweep_dir = sweep_of(store, "search", "hparams_search=bi_lr",
                                           "hydra.sweeper.n_trials=4")
    assert result.returncode == 0, result.stderr[-3000:]
    return {"result": result, "id": sweep_id, "dir": sweep_dir}


@pytest.fixture(scope="module")
def section(search, store) -> dict:
    client = store["client"]
    best = tuning.best_trial(tuning.trials(client, search["id"]))
    retrain, retrained_id, _ = sweep_of(store, "retrained", "model=bi",
                                        *tuning.retrain_overrides(best), "train.seed=0,1")
    book, book_id, _ = sweep_of(store, "book", "model=uni,bi", "train.seed=0,1")
    assert retrain.returncode == 0 and book.returncode == 0, retrain.stderr + book.stderr
    return {"best": best, "retrained": retrained_id, "book": book_id}


def findings(store: dict, tuned: list[str]):
    paths = [p for p in store["paths"] if p.startswith(("tracking.", "paths.reports"))]
    return findings_command(*paths, "claim.sweeps=[]", "capacity.sweeps=[]",
                 "merges.sweeps=[]", "fashion.sweeps=[]", f"tuned.sweeps=[{','.join(tuned)}]",
                 "tuned.commands=['python -m pipeline.stages.train -m hparams_search=bi_lr']",
                 timeout=120)


@pytest.mark.slow  # a real 4-trial search and a retraining: ~35 s of fixtures
def test_findings_section_compares_the_retrained_best_with_the_book(search, section, store):
    result = findings(store, [search["id"], section["retrained"], section["book"]])
    assert result.returncode == 0, result.stderr[-3000:]
    reports = store["tmp"] / "reports"
    page = (reports / "findings.md").read_text()
    text = " ".join(page.split("## 5. A tuned bidirectional net")[1].split())  # one line
    best = section["best"]
    client = store["client"]
    tuned = [r.data.metrics["test_acc_best"] for r in runs_of(client, section["retrained"]).values()]
    book_bi = [r.data.metrics["test_acc_best"] for r in runs_of(client, section["book"]).values()
               if r.data.tags["model_kind"] == "bi"]
    diff = sum(tuned) / 2 - sum(book_bi) / 2
    assert f"difference of {100 * diff:+.2f} points" in text  # the answer's Welch difference
    assert (f"The best trial, {int(best['trial'])} (validation loss "
            f"{best['best_val_loss']:.4f})") in text
    assert "TPESampler seed=0 n_startup_trials=8, 4 trials, minimize" in text
    assert text.count("| finished |") == 4  # the table of the 4 trials
    assert "over 10 epochs the same fractions of the run give" in text
    for figure in ("tuned_search.png", "tuned_per_seed.png"):
        assert (reports / "findings" / figure).read_bytes()[:4] == b"\x89PNG"
        assert f"(findings/{figure})" in text
    assert "python -m pipeline.stages.train -m hparams_search=bi_lr" in text
    assert str(store["tmp"]) not in page  # no absolute paths


@pytest.mark.slow  # a real 4-trial search and a retraining: ~35 s of fixtures
def test_findings_refuse_a_retraining_of_another_schedule(search, section, store):
    # The book sweep's bi runs did not use the best trial's schedule.
    result = findings(store, [search["id"], section["book"], section["book"]])
    assert result.returncode == 1
    (line,) = error_lines(result)
    assert line.startswith(f"error: tuned: sweep '{section['book']}' (job ")
    assert "retrain with model.lr=" in line


def test_tuned_needs_three_sweeps():
    cfg = OmegaConf.create({"tuned": {"sweeps": ["a", "b"], "commands": []}, "confidence": 0.95})
    with pytest.raises(StageError, match=r"tuned.sweeps: needs \[<search>, <retrained>"):
        tuning.tuned_section(None, cfg, None)
