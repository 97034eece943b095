"""The sweep report's pieces without MLflow: sweep ids, configuration labels, the aggregation
over seeds, the bi-minus-uni intervals and the sentence on the book's claim."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from pipeline.guard.errors import StageError
from pipeline.sweeps import job as sweep
from pipeline.sweeps import page, statistics
from pipeline.sweeps import runs as sweep_runs


@pytest.mark.parametrize("sweep_dir, expected", [
    ("multirun/2026-11-28/12-34-56", "2026-11-28_12-34-56"),  # Hydra's default
    ("multirun/seeds", "seeds"),
    ("sweeps/lr", "sweeps_lr"),
    ("/tmp/x/sweep", "tmp_x_sweep"),
])
def test_sweep_id_from_the_sweep_dir(sweep_dir, expected):
    assert sweep.sweep_id(sweep_dir) == expected


def test_sweep_ids_with_quotes_are_refused():
    with pytest.raises(StageError, match="hydra.sweep.dir"):
        sweep.sweep_id("multirun/it's")
    with pytest.raises(StageError, match="sweep: .* is not a sweep id"):
        sweep.check_id("a'b")


def test_swept_keys_are_the_ones_with_several_values():
    assert sweep.swept_keys(["model=uni,bi", "train.seed=range(0,3)", "experiment=quick",
                             "model.lr_milestones={30:0.007,50:0.005}"]) == ["model", "train.seed"]
    assert sweep.override_key("+model.lr=1e6") == "model.lr"


def fake_run(job: int, overrides: list[str], kind: str, status: str = "FINISHED", **metrics):
    return SimpleNamespace(
        info=SimpleNamespace(run_id=f"run{job}", status=status),
        data=SimpleNamespace(
            tags={"hydra_overrides": json.dumps(overrides), "model_kind": kind,
                  sweep.JOB_TAG: str(job)},
            params={"train.seed": next((o.split("=")[1] for o in overrides
                                        if o.startswith("train.seed=")), "0"),
                    "param_count": "2282" if kind == "uni" else "2170"},
            metrics=metrics))


def test_configuration_labels_name_what_varies_besides_the_seed():
    runs = [fake_run(0, ["experiment=quick", "model=uni", "train.seed=0"], "uni"),
            fake_run(1, ["experiment=quick", "model=bi", "model.merge=sum", "train.seed=0"], "bi"),
            fake_run(2, ["experiment=quick", "model=bi", "model.merge=concat", "train.seed=1"], "bi")]
    assert sweep_runs.configuration_labels(runs) == ["uni", "bi model.merge=sum",
                                                     "bi model.merge=concat"]


UNI = [0.9449, 0.9506, 0.9404]  # the seed notes' uni best accuracies (seeds 0-2)
BI = [0.9538, 0.9495, 0.9488]  # and bi's


def job_table(uni=UNI, bi=BI, uni_params=2282, bi_params=2170) -> pd.DataFrame:
    rows = []
    for kind, values, params in (("uni", uni, uni_params), ("bi", bi, bi_params)):
        for seed, acc in enumerate(values):
            rows.append({"sweep": "s", "job": len(rows), "configuration": kind, "kind": kind, "seed": seed,
                         "status": "FINISHED", "param_count": params,
                         "test_acc_best": acc, "test_loss_best": 1 - acc,
                         "test_acc_last": acc - 0.001, "test_loss_last": 1.01 - acc,
                         "train_seconds": 60.0, "job_seconds": 70.0, "run_id": f"r{len(rows)}",
                         "error": ""})
    rows.append({**rows[0], "job": len(rows), "status": "FAILED", "test_acc_best": None,
                 "error": "training loss became 1e4"})
    return pd.DataFrame(rows)


def test_summary_is_mean_sd_min_max_over_finished_seeds():
    summary = statistics.summarize(job_table()).set_index("configuration")
    assert list(summary.index) == ["uni", "bi"]  # the book's order; the failed job left out
    uni = summary.loc["uni"]
    assert uni["seeds"] == 3 and uni["param_count"] == 2282
    assert uni["test_acc_best_mean"] == pytest.approx((0.9449 + 0.9506 + 0.9404) / 3, abs=1e-12)
    # deviations from 0.945633...: -0.000733, 0.004967, -0.005233; sd = sqrt(sum sq / 2)
    assert uni["test_acc_best_std"] == pytest.approx(0.0051117, abs=1e-7)
    assert (uni["test_acc_best_min"], uni["test_acc_best_max"]) == (0.9404, 0.9506)
    assert summary.loc["bi", "test_loss_last_mean"] == pytest.approx(
        1.01 - sum(BI) / 3, abs=1e-12)


def test_differences_are_welch_intervals_of_bi_minus_uni():
    diffs = statistics.differences(job_table(), confidence=0.95)
    assert len(diffs) == 1
    pair = diffs.iloc[0]
    expected = statistics.welch_interval(BI, UNI, 0.95)
    assert (pair["test_acc_best_diff"], pair["test_acc_best_low"], pair["test_acc_best_high"]) \
        == pytest.approx((expected.difference, expected.low, expected.high))
    assert pair["test_loss_best_diff"] == pytest.approx(-expected.difference)
    assert pair["test_acc_best_dof"] == pytest.approx(expected.dof)


def test_no_interval_from_a_single_seed():
    assert statistics.differences(job_table(uni=[0.95]), 0.95).empty


@pytest.mark.parametrize("uni, bi, bi_params, words", [
    ([0.940, 0.942, 0.941], [0.958, 0.957, 0.959], 2170, "the book's claim holds at 95% confidence"),
    (UNI, BI, 2170, "neither confirm nor refute"),
    ([0.958, 0.957, 0.959], [0.940, 0.942, 0.941], 2170, "does not hold: at 95% confidence uni is better"),
    ([0.940, 0.942, 0.941], [0.958, 0.957, 0.959], 2370, "it is not smaller"),
])
def test_verdict_sentence(uni, bi, bi_params, words):
    pair = statistics.differences(job_table(uni, bi, bi_params=bi_params), 0.95).iloc[0]
    sentence = page.verdict(pair)
    assert words in sentence
    assert f"{100 * (sum(bi) / 3 - sum(uni) / 3):+.2f} points" in sentence
    assert "Welch's t with" in sentence and "With the last parameters the difference is" in sentence


def test_page_lists_the_failed_job_and_the_books_rows():
    book = {"test": {"uni": {"best": {"loss": 0.176821, "accuracy": 0.9517},
                             "last": {"loss": 0.186573, "accuracy": 0.9488}},
                     "bi": {"best": {"loss": 0.146799, "accuracy": 0.958},
                            "last": {"loss": 0.144703, "accuracy": 0.958}}},
            "param_count": {"uni": 2281, "bi": 2060}}
    jobs = job_table()
    summary = statistics.summarize(jobs)
    diffs = statistics.differences(jobs, 0.95)
    context = {"report_id": "s", "command": "python -m pipeline.commands.sweep_report sweep=s",
               "experiment": "e", "dataset": "mnist", "training": "t", "confidence": 0.95,
               "report_run": None,
               "sweeps": [{"id": "s", "parent": "p", "overrides": "model=uni,bi", "preset": "book",
                           "launcher": "joblib", "wall_seconds": 200.0}]}
    text = page.page(context, summary, diffs, jobs, book)
    assert text.startswith("# Sweep `s`: ") and "Preset" not in text
    assert "| book, uni (one unseeded run) |" in text and "95.17%" in text
    assert "job 6 (`uni`, seed 0), FAILED: training loss became 1e4" in text
    assert "wall time / sum of job times = **0.41**" in text  # 200 / (7 jobs x 70 s)
    metrics = page.parent_metrics(summary, diffs)
    assert metrics["uni.test_acc_best.mean"] == pytest.approx(sum(UNI) / 3)
    assert not any(math.isnan(v) for v in metrics.values())
    assert len(metrics) <= page.PARENT_METRICS_MAX   # with the sweep's own four: ten
    assert list(metrics)[:3] == ["bi-uni.test_acc_best.diff", "bi-uni.test_acc_best.low",
                                 "bi-uni.test_acc_best.high"]


def test_an_inconclusive_verdict_says_how_many_seeds_would_settle_it():
    pair = statistics.differences(job_table(UNI, BI), 0.95).iloc[0]
    needed = statistics.seeds_needed(pair["test_acc_best_diff"], pd.Series(BI).std(),
                                     pd.Series(UNI).std())
    assert needed is not None and needed > 3
    assert f"would need {needed} seeds per model" in page.verdict(pair)


def test_the_report_describes_a_sweep_without_where_it_tracked():
    from pipeline.sweeps.report import experiment_overrides

    described = experiment_overrides(
        "model=uni,bi train.seed=range(0,5) tracking.uri=sqlite:////home/me/mlflow.db")
    assert described == "model=uni,bi train.seed=range(0,5)"


def test_a_runs_schedule_reads_as_its_rates_and_epochs():
    from pipeline.sweeps.runs import schedule_text

    assert schedule_text({"model.lr": "0.005", "model.lr_milestones": "{}"}) == "0.005 constant"
    assert schedule_text({"model.lr": "0.01", "model.lr_milestones":
                          '{"50": 0.005, "30": 0.008, "70": 0.002}'}) == \
        "0.01; 0.008 from epoch 30, 0.005 from 50, 0.002 from 70"
    assert schedule_text({}) == ""  # a job that failed before training logged no model.lr


# ----------------------------------------------------------------- per-image predictions
class _Store:
    """The two calls the report makes per run: list_artifacts and download_artifacts, over
    artifacts logged with log_artifact (as a job logs them)."""

    def __init__(self):
        self.files = {}

    def log_artifact(self, run_id, local, folder):
        from pathlib import Path
        self.files[(run_id, f"{folder}/{Path(local).name}")] = Path(local).read_bytes()

    def list_artifacts(self, run_id, folder):
        return [SimpleNamespace(path=path) for (run, path) in self.files
                if run == run_id and path.startswith(folder + "/")]

    def download_artifacts(self, run_id, path, dst):
        from pathlib import Path
        target = Path(dst) / Path(path).name
        target.write_bytes(self.files[(run_id, path)])
        return str(target)


def _evaluation(predicted):
    return SimpleNamespace(predictions=np.asarray(predicted, dtype=np.int64))


def test_a_jobs_predictions_reach_the_reports_file_one_row_per_finished_run(tmp_path):
    from pipeline.sweeps import predictions
    labels = np.array([3, 1, 4, 1, 5, 9, 2, 6], dtype=np.int64)
    store = _Store()
    for run_id, shift in (("r0", 0), ("r1", 1), ("r3", 2)):
        guess = labels.copy()
        guess[:shift] = (guess[:shift] + 1) % 10
        predictions.log_job_predictions(store, run_id, {"best": _evaluation(guess),
                                                        "last": _evaluation(labels)}, labels)
    assert ("r0", "evaluation/test_predictions.npz") in store.files
    jobs = job_table()  # r0-r2 uni, r3-r5 bi, r6 failed; r2 ran before jobs logged predictions
    jobs["sweep"] = "s"
    arrays = predictions.gather(store, jobs)
    assert list(arrays["run_id"]) == ["r0", "r1", "r3"] and list(arrays["job"]) == [0, 1, 3]
    assert arrays["best"].dtype == arrays["last"].dtype == arrays["labels"].dtype == np.uint8
    assert arrays["best"].shape == (3, 8)
    assert list((arrays["best"] == arrays["labels"]).sum(axis=1)) == [8, 7, 6]
    assert (arrays["last"] == labels).all() and (arrays["labels"] == labels).all()
    # Written compressed, the same arrays give the same bytes.
    predictions.write_report_file(tmp_path, arrays)
    first = (tmp_path / "predictions.npz").read_bytes()
    predictions.write_report_file(tmp_path, predictions.gather(store, jobs))
    assert (tmp_path / "predictions.npz").read_bytes() == first
    with np.load(tmp_path / "predictions.npz") as saved:
        assert saved["best"].tolist() == arrays["best"].tolist()


def test_a_report_without_any_predictions_writes_no_file_and_other_labels_are_refused(tmp_path):
    from pipeline.sweeps import predictions
    store, jobs = _Store(), job_table()
    jobs["sweep"] = "s"
    assert predictions.gather(store, jobs) is None
    predictions.write_report_file(tmp_path, None)
    assert not (tmp_path / "predictions.npz").exists()
    for run_id, labels in (("r0", [1, 2, 3]), ("r1", [1, 2, 4])):
        predictions.log_job_predictions(store, run_id, {"best": _evaluation(labels),
                                                        "last": _evaluation(labels)}, labels)
    with pytest.raises(StageError, match="run r1 .*test labels differ"):
        predictions.gather(store, jobs)


def test_runs_csv_records_each_runs_numerics_empty_before_the_tag():
    pinned = fake_run(0, ["model=uni", "train.seed=0"], "uni")
    pinned.data.tags["numerics"] = "pinned"
    older = fake_run(1, ["model=uni", "train.seed=1"], "uni")
    table = sweep_runs.job_table([pinned, older])
    assert list(table["numerics"]) == ["pinned", ""]
