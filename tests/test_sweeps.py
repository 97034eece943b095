"""Sweeps through the real entry points: parallel jobs (joblib, 2 at a time) into one SQLite
store, grouped under their sweep; failing jobs that do not stop the others; the multi-seed
report built from MLflow alone; bad input.

Every sweep here is tiny (1 epoch on 1,500 samples: a few seconds a job) and tracks into its
own SQLite file with metrics sent at every checkpoint (flush_every_seconds=0), the most
writes the jobs can make.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from pipeline.sweeps import job as sweep
from pipeline_testkit import CHECKPOINT_METRICS, ROOT, TEST_METRICS, clean_env, error_lines, stage
from pipeline_testkit import run_sweep as sweep_into
from pipeline_testkit import sweep_store

TINY = ("experiment=quick", "train.epochs=1", "train.train_limit=1500", "train.val_limit=300",
        "tracking.flush_every_seconds=0")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, prepared_dir) -> dict:
    return sweep_store(tmp_path_factory.mktemp("sweeps"), prepared_dir)


def run_sweep(workspace: dict, name: str, *overrides: str):
    return sweep_into(workspace, workspace["tmp"] / name, *TINY, *overrides)


def compare(workspace: dict, *overrides: str):
    paths = [p for p in workspace["paths"] if p.startswith(("tracking.", "paths.reports"))]
    return stage("commands.sweep_report", *paths, *overrides, timeout=120)


def runs_of(client, sweep_id: str, role: str) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, f"tags.sweep_id = '{sweep_id}' and "
                                           f"tags.sweep_role = '{role}'")


def by_job(runs) -> dict:
    return {int(run.data.tags["sweep_job"]): run for run in runs}


# ----------------------------------------------------------------------------- a good sweep
@pytest.fixture(scope="module")
def seeds(workspace) -> dict:
    result, sweep_id, sweep_dir = run_sweep(workspace, "seeds", "model=uni,bi", "train.seed=0,1")
    return {"result": result, "id": sweep_id, "dir": sweep_dir, "client": workspace["client"]}


def test_parallel_sweep_ends_with_a_summary_line(seeds):
    result = seeds["result"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert error_lines(result) == []
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith(f"sweep {seeds['id']}: 4 jobs finished, ")
    assert last.endswith(f"report: python -m pipeline.commands.sweep_report sweep={seeds['id']}")


def test_every_job_is_one_run_nested_under_the_sweeps_parent(seeds):
    client = seeds["client"]
    (parent,) = runs_of(client, seeds["id"], "parent")
    assert parent.info.status == "FINISHED" and parent.info.run_name == f"sweep {seeds['id']}"
    assert parent.data.tags["sweep_overrides"].endswith("model=uni,bi train.seed=0,1")
    assert parent.data.metrics["jobs"] == 4 and parent.data.metrics["jobs_failed"] == 0
    jobs = by_job(runs_of(client, seeds["id"], "job"))
    assert sorted(jobs) == [0, 1, 2, 3]
    assert {(r.data.tags["model_kind"], r.data.params["train.seed"]) for r in jobs.values()} == \
        {("uni", "0"), ("uni", "1"), ("bi", "0"), ("bi", "1")}
    for run in jobs.values():
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.experiment_id == parent.info.experiment_id
        assert run.data.tags["mlflow.source.name"] == "pipeline/stages/train.py"  # not the worker's
        seed = run.data.params["train.seed"]
        assert run.info.run_name == f"{run.data.tags['model_kind']}-mnist-seed{seed}"


def test_every_metric_of_every_job_is_there_exactly_once(seeds):
    client = seeds["client"]
    for num, run in by_job(runs_of(client, seeds["id"], "job")).items():
        kind = run.data.tags["model_kind"]
        history = pd.read_csv(seeds["dir"] / str(num) / "metrics" / f"history_{kind}.csv")
        assert len(history) == 2  # 1 epoch, a checkpoint every half epoch
        for key in CHECKPOINT_METRICS:
            logged = client.get_metric_history(run.info.run_id, key)
            assert sorted(m.step for m in logged) == history["iteration"].tolist(), (num, key)
            assert [m.value for m in sorted(logged, key=lambda m: m.step)] == \
                pytest.approx(history[key].tolist(), rel=1e-12)
        for key in (*TEST_METRICS, "train_seconds", "job_seconds", "best_val_loss"):
            assert len(client.get_metric_history(run.info.run_id, key)) == 1, (num, key)
        assert 0.0 <= run.data.metrics["test_acc_best"] <= 1.0
        assert run.data.tags["evaluated_on"] == "mnist test (10000 images)"
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"best.npz", "history.csv", "run.json", "evaluation"} <= artifacts


def test_jobs_write_their_files_under_their_own_folders(seeds, workspace):
    for num, kind in ((0, "uni"), (1, "uni"), (2, "bi"), (3, "bi")):  # Hydra's job order
        job_dir = seeds["dir"] / str(num)
        assert (job_dir / "models" / kind / "best.npz").is_file()
        assert (job_dir / "metrics" / f"train_{kind}.json").is_file()
        assert (job_dir / "metrics" / f"test_{kind}.json").is_file()  # tested after training
    # and a sweep registers nothing (conf/train.yaml)
    assert workspace["client"].search_registered_models() == []


def test_a_sweep_job_refuses_to_write_outside_its_own_folder(workspace, tmp_path):
    # Parallel jobs writing into one models/ would replace each other's files.
    result, _, _ = run_sweep(workspace, "shared", "model=uni",
                             f"paths.models_dir={tmp_path / 'models'}")
    assert result.returncode == 1
    assert any(line.startswith("error: job 0: config error: paths.models_dir: ") and
               "a sweep job writes only under its own folder" in line
               for line in error_lines(result))
    assert not (tmp_path / "models").exists()


def test_jobs_ran_two_at_a_time(seeds):
    runs = runs_of(seeds["client"], seeds["id"], "job")
    spans = sorted((r.info.start_time, r.info.end_time) for r in runs)
    overlapping = sum(1 for (s1, e1), (s2, e2) in zip(spans, spans[1:]) if s2 < e1)
    assert overlapping >= 1, spans


def test_a_used_sweep_dir_is_refused_before_any_job_runs(seeds, workspace):
    result, _, _ = run_sweep(workspace, "seeds", "model=uni")
    assert result.returncode == 1
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: sweep {seeds['id']!r} already exists (parent run ")
    assert len(runs_of(seeds["client"], seeds["id"], "job")) == 4


# ----------------------------------------------------------------------------- the report
@pytest.fixture(scope="module")
def report(seeds, workspace) -> dict:
    # From MLflow alone: the sweep's folder (models, logs) is out of the way meanwhile.
    hidden = seeds["dir"].with_name("hidden")
    os.rename(seeds["dir"], hidden)
    try:
        result = compare(workspace, f"sweep={seeds['id']}")
    finally:
        os.rename(hidden, seeds["dir"])
    return {"result": result, "dir": workspace["tmp"] / "reports" / "sweeps" / seeds["id"]}


def test_report_aggregates_the_runs_of_the_sweep(report, seeds):
    assert report["result"].returncode == 0, report["result"].stderr
    runs = by_job(runs_of(seeds["client"], seeds["id"], "job"))
    summary = pd.read_csv(report["dir"] / "summary.csv").set_index("configuration")
    assert list(summary.index) == ["uni", "bi"]
    for kind in ("uni", "bi"):
        accs = [r.data.metrics["test_acc_best"] for r in runs.values()
                if r.data.tags["model_kind"] == kind]
        assert summary.loc[kind, "seeds"] == 2
        assert summary.loc[kind, "test_acc_best_mean"] == pytest.approx(sum(accs) / 2, rel=1e-12)
        assert summary.loc[kind, "test_acc_best_min"] == min(accs)
    table = pd.read_csv(report["dir"] / "runs.csv")
    assert sorted(table["job"]) == [0, 1, 2, 3] and set(table["status"]) == {"FINISHED"}
    diffs = pd.read_csv(report["dir"] / "differences.csv")
    assert len(diffs) == 1 and diffs.loc[0, "bi"] == "bi" and diffs.loc[0, "uni"] == "uni"
    assert diffs.loc[0, "test_acc_best_diff"] == pytest.approx(
        summary.loc["bi", "test_acc_best_mean"] - summary.loc["uni", "test_acc_best_mean"])


def test_every_jobs_test_predictions_reach_the_report(report, seeds):
    # Each job logs its per-image predictions (best and last parameters); the report, from
    # MLflow alone, commits them in one compressed file with the labels once, and runs.csv
    # says which numerics each run ran.
    import numpy as np
    runs = by_job(runs_of(seeds["client"], seeds["id"], "job"))
    table = pd.read_csv(report["dir"] / "runs.csv", keep_default_na=False)
    assert set(table["numerics"]) == {runs[0].data.tags["numerics"]} and table["numerics"][0]
    with np.load(report["dir"] / "predictions.npz") as saved:
        assert list(saved["job"]) == [0, 1, 2, 3] and set(saved["sweep"]) == {seeds["id"]}
        assert list(saved["run_id"]) == list(table["run_id"])
        assert saved["best"].dtype == np.uint8 and saved["best"].shape == (4, len(saved["labels"]))
        for row, job in enumerate(saved["job"]):
            for rule in ("best", "last"):
                accuracy = (saved[rule][row] == saved["labels"]).mean()
                assert accuracy == runs[int(job)].data.metrics[f"test_acc_{rule}"]


def test_report_page_figure_and_parent_run(report, seeds):
    page = (report["dir"] / "report.md").read_text()
    assert page.startswith(f"# Sweep `{seeds['id']}`")
    assert "## Bidirectional minus unidirectional" in page and "per_seed.png" in page
    assert re.search(r"^\| book, bi \(one unseeded run\) +\|", page, flags=re.M)
    verdict = re.search(r"^- `bi` minus `uni`: .*$", page, flags=re.M).group(0)
    assert verdict[2:] in report["result"].stdout  # printed too
    assert (report["dir"] / "per_seed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    client = seeds["client"]
    (parent,) = runs_of(client, seeds["id"], "parent")
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "report")} >= {
        "report/report.md", "report/summary.csv", "report/per_seed.png"}
    summary = pd.read_csv(report["dir"] / "summary.csv").set_index("configuration")
    assert parent.data.metrics["uni.test_acc_best.mean"] == pytest.approx(
        summary.loc["uni", "test_acc_best_mean"])
    assert "bi-uni.test_acc_best.low" in parent.data.metrics
    assert len(parent.data.metrics) <= 10   # the rest is in the artifacts: ten charts, not fifty
    # Its description holds the verdict and the figure (from the run's artifacts).
    figure = f"get-artifact?path=report/per_seed.png&run_uuid={parent.info.run_id}"
    note = parent.data.tags["mlflow.note.content"]
    assert verdict in note and f"]({figure})" in note and "once they are done" not in note


def test_a_report_of_other_runs_never_replaces_a_committed_one(report, seeds, workspace):
    # A committed report of the same sweep id, made from other runs (the id used again with
    # a new store): refused in one line, every file left as it was.
    folder = report["dir"]
    table = pd.read_csv(folder / "runs.csv")
    original = table.loc[0, "run_id"]
    table.loc[0, "run_id"] = "0123456789abcdef0123456789abcdef"
    table.to_csv(folder / "runs.csv", index=False)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    result = compare(workspace, f"sweep={seeds['id']}")
    assert result.returncode == 1
    [line] = error_lines(result)
    assert line == (f"error: {folder}: holds the report of 1 runs that are not in these "
                    "sweeps (the same id used again, or another tracking store): give the "
                    "sweep a new id, or move that folder away first")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    # the report of the same runs is rewritten, as before
    table.loc[0, "run_id"] = original
    table.to_csv(folder / "runs.csv", index=False)
    assert compare(workspace, f"sweep={seeds['id']}").returncode == 0


# ----------------------------------------------------------------------------- failures
@pytest.fixture(scope="module")
def failing(workspace) -> dict:
    # Jobs in Hydra's order: 0 lr 0.01 / bwd 20 (fine), 1 lr 0.01 / bwd 10 (the schema refuses
    # unequal sizes for the sum merge), 2 lr 1e6 / bwd 20 (diverges), 3 lr 1e6 / bwd 10.
    result, sweep_id, sweep_dir = run_sweep(workspace, "failing", "model=bi",
                                            "model.lr=0.01,1e6", "model.hidden_bwd=20,10")
    return {"result": result, "id": sweep_id, "dir": sweep_dir, "client": workspace["client"]}


def test_failed_jobs_do_not_stop_the_others(failing):
    jobs = by_job(runs_of(failing["client"], failing["id"], "job"))
    assert sorted(jobs) == [0, 1, 2, 3]  # one run per job, failed or not
    assert jobs[0].info.status == "FINISHED"
    assert set(TEST_METRICS) <= set(jobs[0].data.metrics)
    assert (failing["dir"] / "0" / "models" / "bi" / "best.npz").is_file()
    for num in (1, 2, 3):
        assert jobs[num].info.status == "FAILED"
        assert not (failing["dir"] / str(num) / "models").exists()
    assert jobs[1].data.tags["error"] == ("config error: model.hidden_bwd: must equal "
                                          "model.hidden_fwd (20) for merge 'sum', got 10")
    assert re.match(r"training loss became \S+ at epoch 0, iteration \d+ \(lr 1000000.0\)",
                    jobs[2].data.tags["error"])
    assert jobs[1].data.params["model.hidden_bwd"] == "10"  # a config failure keeps its config
    assert jobs[1].data.params["dataset"] == "mnist"
    assert {key.split(".")[0] for key in jobs[1].data.params} == {"model", "train", "dataset"}


def test_a_sweep_with_failed_jobs_exits_1_naming_them(failing):
    result = failing["result"]
    assert result.returncode == 1
    lines = error_lines(result)
    assert any(line.startswith("error: job 2: training loss became") for line in lines)
    summary = lines[-1]
    assert summary.startswith(f"error: sweep {failing['id']}: 3 of 4 jobs failed: "
                              "job 1 (model.lr=0.01 model.hidden_bwd=10) FAILED: config error: ")
    assert "; job 2 (model.lr=1000000.0 model.hidden_bwd=20) FAILED: training loss became" in summary
    assert "; job 3 (model.lr=1000000.0 model.hidden_bwd=10) FAILED: " in summary
    (parent,) = runs_of(failing["client"], failing["id"], "parent")
    assert parent.info.status == "FAILED"
    assert parent.data.tags["error"] == summary.removeprefix("error: ")
    assert parent.data.metrics["jobs_failed"] == 3


def test_a_sweep_without_its_end_hook_exits_1_when_a_job_failed(workspace):
    # hydra.callbacks removed: no end hook names the failed job, and the sweep exited 0.
    result, sweep_id, _ = run_sweep(workspace, "no-end-hook", "~hydra.callbacks.sweep",
                                    "model=bi", "model.hidden_bwd=20,10")
    assert result.returncode == 1, result.stderr[-3000:]
    assert error_lines(result)[-1] == ("error: job 1: config error: model.hidden_bwd: must "
                                       "equal model.hidden_fwd (20) for merge 'sum', got 10")
    jobs = by_job(runs_of(workspace["client"], sweep_id, "job"))
    assert {num: run.info.status for num, run in jobs.items()} == {0: "FINISHED", 1: "FAILED"}


# ----------------------------------------------------------------------------- bad input
def test_a_sweep_of_one_model_gets_its_runs_table_without_a_comparison(failing, workspace):
    # A sweep of one model is half of a comparison (e.g. the study's one-cell sweeps): its
    # report keeps its runs; the page says how to compare it with the other model's sweep.
    result = compare(workspace, f"sweep={failing['id']}")
    assert result.returncode == 0, result.stderr[-2000:]
    folder = workspace["tmp"] / "reports" / "sweeps" / failing["id"]
    table = pd.read_csv(folder / "runs.csv")
    assert list(table["status"]) == ["FINISHED", "FAILED", "FAILED", "FAILED"]
    assert list(table["kind"]) == ["bi"] * 4 and table["best_val_loss"].notna().iloc[0]
    assert "finished runs of bi only: to compare, report it together with a sweep of the " \
           "other model" in (folder / "report.md").read_text()


def test_compare_of_an_unknown_sweep_fails_in_one_line(workspace, seeds):
    result = compare(workspace, "sweep=no-such-sweep")
    assert result.returncode == 1
    lines = error_lines(result)
    assert len(lines) == 1
    assert lines[0].startswith(f"error: sweep=no-such-sweep: no runs tagged sweep_id='no-such-sweep' "
                               f"in tracking store {workspace['db']} (recent sweeps: ")
    assert seeds["id"] in lines[0]
    assert not (workspace["tmp"] / "reports" / "sweeps" / "no-such-sweep").exists()


def test_a_report_over_runs_of_two_datasets_fails_in_one_line(workspace, seeds):
    """bi on one dataset against uni on another says nothing about the book's claim."""
    client = seeds["client"]
    bi_runs = [run for run in runs_of(client, seeds["id"], "job")
               if run.data.tags["model_kind"] == "bi"]
    try:
        for run in bi_runs:
            client.set_tag(run.info.run_id, "dataset", "fashion_mnist")
        result = compare(workspace, f"sweep={seeds['id']}")
    finally:
        for run in bi_runs:
            client.set_tag(run.info.run_id, "dataset", "mnist")
    assert result.returncode == 1
    assert error_lines(result) == [
        f"error: sweep={seeds['id']}: runs on several datasets (fashion_mnist, mnist); the "
        "report compares uni with bi on one test set: report each dataset's sweep on its own"]


def test_compare_refuses_a_confidence_outside_its_range(workspace):
    result = compare(workspace, "sweep=x", "confidence=1.5")
    assert result.returncode == 1
    assert error_lines(result) == ["error: config error: confidence: must be in [0.5, 1), got 1.5"]


def test_ctrl_c_ends_the_sweep_and_its_runs_killed(workspace):
    sweep_dir = workspace["tmp"] / "interrupted"
    sweep_id = sweep.sweep_id(str(sweep_dir))
    command = [sys.executable, "-m", "pipeline.stages.train", "-m", "hydra/launcher=joblib",
               "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep_dir}", *workspace["paths"],
               "experiment=quick", "train.epochs=50", "model=uni,bi"]
    # A terminal's Ctrl-C sends SIGINT to the whole process group: the sweep and its workers.
    process = subprocess.Popen(command, cwd=ROOT, env=clean_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 90
        while len(runs_of(workspace["client"], sweep_id, "job")) < 2:
            assert time.monotonic() < deadline and process.poll() is None, "jobs did not start"
            time.sleep(0.5)
        os.killpg(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130 and stderr.strip().endswith("error: interrupted")
    runs = runs_of(workspace["client"], sweep_id, "job") + runs_of(workspace["client"], sweep_id,
                                                                    "parent")
    assert [r.info.status for r in runs] == ["KILLED"] * 3


def test_report_of_two_sweeps_together(seeds, failing, workspace):
    # e.g. a uni seed sweep next to a bi sweep of settings uni does not have
    result = compare(workspace, f"sweep=[{seeds['id']},{failing['id']}]")
    assert result.returncode == 0, result.stderr
    folder = workspace["tmp"] / "reports" / "sweeps" / f"{seeds['id']}+{failing['id']}"
    runs = pd.read_csv(folder / "runs.csv")
    assert len(runs) == 8 and set(runs["sweep"]) == {seeds["id"], failing["id"]}
    summary = pd.read_csv(folder / "summary.csv")
    assert list(summary["configuration"]) == ["uni", "bi", "bi model.lr=0.01 model.hidden_bwd=20"]
    assert list(summary["seeds"]) == [2, 2, 1]
    page = (folder / "report.md").read_text()
    assert page.startswith(f"# Sweeps `{seeds['id']}` + `{failing['id']}`: ")
    client = workspace["client"]
    experiments = [e.experiment_id for e in client.search_experiments()]
    (report_run,) = client.search_runs(
        experiments, f"tags.compared_sweeps = '{seeds['id']},{failing['id']}'")
    assert report_run.info.status == "FINISHED"
    assert f"this report's run `{report_run.info.run_id}`" in page
    assert "report/report.md" in {a.path for a in client.list_artifacts(report_run.info.run_id, "report")}
