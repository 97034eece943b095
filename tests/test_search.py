"""Hyperparameter searches: the step schedule given as fractions of the run, the
hparams_search=bi_lr preset, and an Optuna search through the real entry point (every trial an
MLflow run under the search's parent; seeded, so reproducible; a diverging trial does not abort
it), tiny and in a temporary store.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from birnn.models import build_model
from pipeline import schema
from pipeline.guard.errors import ConfigError, StageError
from pipeline.paths import CONF_DIR
from pipeline.stages.train import make_settings
from pipeline.sweeps import job as sweep
from pipeline_testkit import error_lines, run_sweep, stage, sweep_store

BOOK_BI = {30: 0.008, 50: 0.005, 70: 0.002}
# Optuna 2 imports its SQL storage with a SQLAlchemy 1 idiom (unused here: storage is null).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:optuna.*")


@pytest.fixture
def compose_cfg():
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        yield lambda *overrides, hydra=False: compose(
            "train", overrides=list(overrides), return_hydra_config=hydra)
    GlobalHydra.instance().clear()


SEARCHED = ("lr", "lr_decay", "lr_decay_every")  # model.<key>: what bi_lr searches


def steps(lr, decay, every, epochs):
    model = OmegaConf.create({"lr": lr, "lr_decay": decay, "lr_decay_every": every,
                              "lr_milestones": {}})
    return schema.lr_milestones(model, epochs)


# ----------------------------------------------------------------------------- the schedule
def test_a_step_schedule_scales_from_30_to_100_epochs():
    # x0.5 every 0.3 of the run: epochs 9, 18, 27 of 30 and 30, 60, 90 of 100, same rates.
    assert steps(0.02, 0.5, 0.3, 30) == {9: 0.01, 18: 0.005, 27: 0.0025}
    assert steps(0.02, 0.5, 0.3, 100) == {30: 0.01, 60: 0.005, 90: 0.0025}
    # Quarter points: 7.5 and 22.5 round half up; a step on the last epoch would never act.
    assert list(steps(0.01, 0.5, 0.25, 30)) == [8, 15, 23]
    assert list(steps(0.01, 0.5, 0.25, 100)) == [25, 50, 75]
    assert steps(0.01, 0.5, 1.0, 100) == {}  # once per run: a constant rate


def test_the_train_stage_trains_with_the_derived_schedule(compose_cfg):
    book = make_settings(compose_cfg("model=bi")).lr
    assert (book.base_lr, book.milestones) == (0.01, BOOK_BI)  # unset: the milestones as given
    cfg = compose_cfg("model=bi", "model.lr=0.02", "model.lr_decay=0.5",
                      "model.lr_decay_every=0.3", "train.epochs=30")
    schedule = make_settings(schema.validate(cfg)).lr
    assert schedule.milestones == {9: 0.01, 18: 0.005, 27: 0.0025}  # replaces the book's
    assert [schedule.at(e) for e in (0, 8, 9, 17, 18, 29)] == [0.02, 0.02, 0.01, 0.01, 0.005,
                                                                0.0025]


@pytest.mark.parametrize("overrides, message", [
    (["model.lr_decay=0.5"], "model.lr_decay: needs model.lr_decay_every"),
    (["model.lr_decay_every=0"], r"model.lr_decay_every: must be null or in \(0, 1\]"),
    (["model.lr_decay_every=1.5"], r"model.lr_decay_every: must be null or in \(0, 1\]"),
    (["model.lr_decay_every=0.3", "model.lr_decay=1.5"], r"model.lr_decay: must be in \(0, 1\]"),
    (["model.lr_decay_every=0.1", "train.epochs=5"],
     "model.lr_decay_every: must leave at least one epoch between steps"),
])
def test_impossible_schedules_are_refused(compose_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        schema.validate(compose_cfg("model=bi", *overrides))


def test_an_impossible_schedule_is_one_line_from_the_entry_point():
    result = stage("train", "model=bi", "model.lr_decay=0.5", timeout=60)
    assert result.returncode == 1
    (line,) = error_lines(result)
    assert line.startswith("error: ")
    assert line.endswith("model.lr_decay: needs model.lr_decay_every (or leave it at 1.0), got 0.5")


# ----------------------------------------------------------------------------- the preset
def test_the_bi_lr_preset_searches_the_schedule_of_the_books_bi_net(compose_cfg):
    cfg = compose_cfg("hparams_search=bi_lr", hydra=True)
    model = build_model("bi", hidden_fwd=cfg.model.hidden_fwd, hidden_bwd=cfg.model.hidden_bwd,
                        merge=cfg.model.merge)
    uni = build_model("uni", hidden_size=compose_cfg().model.hidden_size)
    assert model.param_count()["total"] == 2170 <= uni.param_count()["total"] == 2282
    assert cfg.train.epochs == 30
    sweeper = cfg.hydra.sweeper
    assert sweeper["_target_"].endswith("OptunaSweeper") and sweeper.storage is None
    assert (sweeper.sampler.seed, sweeper.direction, sweeper.n_trials) == (0, "minimize", 16)
    assert set(sweeper.params) == {"model.lr", "model.lr_decay", "model.lr_decay_every"}
    # What the sweep's parent run records: 16 jobs, the searched keys, the sampler.
    assert sweep.planned_jobs(cfg.hydra) == 16
    assert sweep.swept_keys(sweep.sweep_overrides(cfg.hydra)) == list(sweeper.params)
    tags = sweep.search_tags(cfg.hydra)
    assert tags[sweep.SAMPLER_TAG].startswith("TPESampler seed=0 n_startup_trials=8, 16 trials")
    # The lower bound of decay_every leaves whole epochs between steps of a 30-epoch trial.
    schema.validate(compose_cfg("hparams_search=bi_lr", "model.lr_decay_every=0.1"))


def test_the_uni_lr_preset_gives_uni_the_same_search_as_bi(compose_cfg):
    # Tuned against tuned compares like with like: same space, trials, epochs, sampler seed.
    uni, bi = (compose_cfg(f"hparams_search={name}", hydra=True) for name in ("uni_lr", "bi_lr"))
    assert uni.model.kind == "uni" and uni.model.hidden_size == 32
    assert uni.train == bi.train
    differ = {"study_name"}
    assert {k: v for k, v in uni.hydra.sweeper.items() if k not in differ} == \
        {k: v for k, v in bi.hydra.sweeper.items() if k not in differ}


def test_a_grid_sweep_still_counts_its_jobs(compose_cfg):
    hydra = compose_cfg("model=uni", hydra=True).hydra  # Hydra's basic sweeper
    hydra = OmegaConf.merge(hydra, {"overrides": {"task": ["model=uni,bi", "train.seed=range(0,3)"]}})
    assert sweep.planned_jobs(hydra) == 6
    assert sweep.search_tags(hydra) == {}


class RecordingLauncher:
    """Stands in for the joblib launcher under Optuna's sweeper: records each batch of trial
    overrides and returns an objective computed from them at once."""

    def __init__(self, objective):
        self.objective, self.batches = objective, []

    def launch(self, overrides, initial_job_idx):
        self.batches.append([tuple(batch) for batch in overrides])
        return [SimpleNamespace(return_value=self.objective(dict(o.split("=") for o in batch)))
                for batch in overrides]


def optuna_search(cfg, sweep_dir, objective) -> list:
    """Run the preset's Optuna sweeper in-process with a RecordingLauncher; its batches."""
    from hydra.utils import instantiate
    from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl

    s = cfg.hydra.sweeper
    sweeper = OptunaSweeperImpl(
        sampler=instantiate(s.sampler), direction=s.direction, storage=s.storage,
        study_name=s.study_name, n_trials=s.n_trials, n_jobs=s.n_jobs,
        max_failure_rate=s.max_failure_rate, search_space=None, custom_search_space=None,
        params=s.params)
    sweep_dir.mkdir()  # Hydra's launcher would have made it
    sweeper.config = OmegaConf.merge(cfg, {"hydra": {"sweep": {"dir": str(sweep_dir)}}})
    sweeper.hydra_context, sweeper.launcher = object(), RecordingLauncher(objective)
    sweeper.sweep(arguments=[])
    return sweeper.launcher.batches


def bowl(params: dict) -> float:  # smallest at lr 0.02, decay 0.5
    return math.log(float(params["model.lr"]) / 0.02) ** 2 + (float(params["model.lr_decay"]) - 0.5) ** 2


def test_the_seeded_search_samples_the_same_16_trials_again(compose_cfg, tmp_path):
    # All 16 trials: the 8 random start-up ones and the 8 TPE proposes from their results.
    cfg = compose_cfg("hparams_search=bi_lr", hydra=True)
    first = optuna_search(cfg, tmp_path / "a", bowl)
    assert [len(batch) for batch in first] == [2] * 8  # two trials handed out at a time
    assert optuna_search(cfg, tmp_path / "b", bowl) == first
    reseeded = OmegaConf.merge(cfg, {"hydra": {"sweeper": {"sampler": {"seed": 1}}}})
    assert optuna_search(reseeded, tmp_path / "c", bowl) != first


def test_a_failed_trial_must_be_inf_not_nan(compose_cfg, tmp_path):
    # Why a failed sweep job returns +inf: Optuna 2's sweeper takes it as the worst loss and
    # goes on, but a NaN makes it raise and abandon the whole search.
    cfg = OmegaConf.merge(compose_cfg("hparams_search=bi_lr", hydra=True),
                          {"hydra": {"sweeper": {"n_trials": 4}}})
    optuna_search(cfg, tmp_path / "inf", lambda params: math.inf)
    assert yaml.safe_load((tmp_path / "inf" / "optimization_results.yaml").read_text())[
        "best_value"] == math.inf
    with pytest.raises(ValueError):
        optuna_search(cfg, tmp_path / "nan", lambda params: math.nan)


# ----------------------------------------------------------------------------- real searches
TINY = ("train.epochs=10", "train.train_limit=500", "train.val_limit=200",
        "tracking.flush_every_seconds=0")


@pytest.fixture(scope="module")
def store(tmp_path_factory, prepared_dir) -> dict:
    return sweep_store(tmp_path_factory.mktemp("tuning"), prepared_dir)


def sweep_of(store: dict, name: str, *overrides: str):
    return run_sweep(store, store["tmp"] / "multirun" / name, *TINY, *overrides)


def runs_of(client, sweep_id: str) -> dict:
    return {int(run.data.tags[sweep.JOB_TAG]): run
            for run in client.search_runs([e.experiment_id for e in client.search_experiments()],
                                          sweep.jobs_filter(sweep_id))}


def sampled(run) -> tuple:
    return tuple(float(run.data.params[f"model.{key}"]) for key in SEARCHED)


@pytest.fixture(scope="module")
def search(store) -> dict:
    result, sweep_id, sweep_dir = sweep_of(store, "search", "hparams_search=bi_lr",
                                           "hydra.sweeper.n_trials=4")
    return {"result": result, "id": sweep_id, "dir": sweep_dir}


@pytest.mark.slow  # a real 4-trial search and a retraining: ~35 s of fixtures
def test_every_trial_is_a_run_under_the_searchs_parent(search, store):
    assert search["result"].returncode == 0, search["result"].stderr[-3000:]
    client = store["client"]
    parent = sweep.find_parent(client, search["id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[sweep.TOTAL_TAG] == "4"  # n_trials: no grid to count
    assert "TPESampler seed=0" in parent.data.tags[sweep.SAMPLER_TAG]
    trials = runs_of(client, search["id"])
    assert sorted(trials) == [0, 1, 2, 3]
    results = yaml.safe_load((search["dir"] / "optimization_results.yaml").read_text())
    for run in trials.values():
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.params["train.epochs"] == "10" and run.data.params["param_count"] == "2170"
        lr, decay, every = sampled(run)
        assert 0.002 <= lr <= 0.05 and 0.1 <= decay <= 1.0 and 0.1 <= every <= 0.5
        assert run.info.run_name.startswith(f"bi-mnist-seed0 model.lr={run.data.params['model.lr']} ")
        # The run trained with the derived schedule: its lr curve steps where the rule says.
        rates = {m.value for m in client.get_metric_history(run.info.run_id, "lr")}
        assert rates == {lr, *steps(lr, decay, every, 10).values()}
    # The sweeper's best is the trial of the lowest best_val_loss that the task returned.
    best = min(trials.values(), key=lambda run: run.data.metrics["best_val_loss"])
    assert math.isclose(results["best_value"], best.data.metrics["best_val_loss"], rel_tol=1e-12)
    assert results["best_params"]["model.lr"] == float(best.data.params["model.lr"])


@pytest.mark.slow  # ~20-30 s; test_a_failed_trial_must_be_inf_not_nan covers the sweeper's side
def test_a_diverging_trial_does_not_abort_the_search(store):
    # Failed jobs return +inf; a NaN made Optuna 2's sweeper raise and abandon the search.
    result, sweep_id, sweep_dir = sweep_of(store, "diverging", "hparams_search=bi_lr",
                                           "hydra.sweeper.n_trials=2", "model.lr=1e6")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert error_lines(result)[-1].startswith(f"error: sweep {sweep_id}: 2 of 2 jobs failed: ")
    assert "diverged" in error_lines(result)[-1]
    assert sweep.find_parent(store["client"], sweep_id).info.status == "FAILED"
    assert yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())[
        "best_value"] == math.inf
