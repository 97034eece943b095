"""A tracking server that goes away costs no training (issue 7, class 4); what a user deleted
in the store (a run, a registered model) stops a stage in one line before it writes anything.

Unit level: the store client's bounded HTTP calls and outage budget, the metric buffer that
keeps values instead of raising into training. End to end, against a real ``mlflow server``:
killed after the first checkpoint (the training finishes, its model is written, one line says
the run could not be completed and how to record it); frozen (SIGSTOP: it accepts connections
and never answers), where logging may hold training for about 30 s in all; and back before the
training ends, where the run finishes normally with every value.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from birnn.models import build_model
from mlflow_server import mlflow_server
from pipeline import prepared_data
from pipeline.tracking import metrics, store
from pipeline_testkit import CHECKPOINT_METRICS, clean_env, error_lines, stage


# ----------------------------------------------------------------------------- unit level
class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class DownClient:
    """An HTTP store that fails every call after ``seconds`` (of a fake clock) until it is up."""

    tracking_uri = "http://127.0.0.1:1"

    def __init__(self, clock: Clock, seconds: float):
        self.clock, self.seconds, self.up, self.calls, self.batches = clock, seconds, False, 0, []
        self.env = []

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self.calls += 1
        self.env.append((os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT"),
                         os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")))
        if not self.up:
            self.clock.now += self.seconds
            raise MlflowException("API request to http://127.0.0.1:1 failed: Connection refused")
        self.batches.append(list(metrics))


def test_a_store_that_stops_answering_is_given_up_after_the_budget():
    clock = Clock()
    down = DownClient(clock, seconds=12)
    client = store.StoreClient(down, request_timeout=10, outage_budget=30, clock=clock)
    for _ in range(3):  # 12 + 12 + 12 s of failing calls: past the 30 s budget
        with pytest.raises(MlflowException):
            client.log_batch("run")
    assert client.gone
    with pytest.raises(store.StoreUnavailable,
                       match=r"stopped answering \(connection refused, for 36 s\)"):
        client.log_batch("run")
    assert down.calls == 3  # the last call never reached the store
    # MLflow's HTTP limits during each call: 10 s per attempt, one retry; then what is left
    # of the budget, halved (30 - 24 = 6 -> 3 s), so that a call never outlasts it by much.
    assert down.env == [("10", "1"), ("9", "1"), ("3", "1")]


def test_a_success_resets_the_outage_count():
    clock = Clock()
    down = DownClient(clock, seconds=20)
    client = store.StoreClient(down, outage_budget=30, clock=clock)
    with pytest.raises(MlflowException):
        client.log_batch("run")
    down.up = True
    client.log_batch("run")
    down.up = False
    with pytest.raises(MlflowException):
        client.log_batch("run")  # 20 s again, not 40: the store answered in between
    assert not client.gone


def test_metric_buffer_keeps_values_while_the_store_is_down_and_sends_them_later(monkeypatch):
    clock = Clock()
    down = DownClient(clock, seconds=0)  # refused at once: no time counts against the budget
    buffer = metrics.MetricBuffer(store.StoreClient(down, clock=clock), "run",
                                  flush_every_seconds=0, retry_every_seconds=0)
    for step in range(600):  # raises nothing into the training
        buffer.add({"val_loss": 1.0, "lr": 0.01}, step=step)
    assert buffer.pending and buffer.error and not down.batches
    down.up = True
    assert buffer.flush()
    assert [len(batch) for batch in down.batches] == [1000, 200]  # MLflow's limit per request
    assert buffer.values_sent == 1200 and buffer.error is None


def test_metric_buffer_stops_trying_once_the_store_is_gone():
    clock = Clock()
    down = DownClient(clock, seconds=20)
    buffer = metrics.MetricBuffer(store.StoreClient(down, outage_budget=30, clock=clock), "run",
                                  flush_every_seconds=0, retry_every_seconds=0)
    for step in range(10):
        buffer.add({"val_loss": 1.0}, step=step)
    assert buffer.gave_up and down.calls == 2  # 20 + 20 s: gone; nothing tried after that
    with pytest.raises(store.StoreUnavailable,
                       match=r"10 metric values were not sent \(tracking store http://127"):
        buffer.finish()


def test_a_silent_server_holds_a_real_client_no_longer_than_the_budget():
    # Accepts connections (the kernel's backlog) and never answers: MLflow's defaults would
    # wait 120 s per attempt, 8 attempts.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        client = store.StoreClient(MlflowClient(f"http://127.0.0.1:{silent.getsockname()[1]}"),
                                   request_timeout=2, outage_budget=6)
        started = time.monotonic()
        with pytest.raises(MlflowException):
            client.log_batch("0" * 32, metrics=[Metric("loss", 1.0, 0, 0)])
        first = time.monotonic() - started
        while not client.gone:
            with pytest.raises(MlflowException):
                client.log_batch("0" * 32, metrics=[Metric("loss", 1.0, 0, 0)])
        with pytest.raises(store.StoreUnavailable):
            client.log_batch("0" * 32, metrics=[Metric("loss", 1.0, 0, 0)])
        total = time.monotonic() - started
    assert 3 < first < 8, first  # 2 attempts of 2 s
    assert total < 6 + 4, total


# ----------------------------------------------------------------------------- end to end
LONG = ("experiment=quick", "train.epochs=150", "train.train_limit=2000", "train.val_limit=200",
        "train.batch_size=100", "tracking.flush_every_seconds=0")


def start_training(server, prepared_dir: Path, work: Path, *overrides: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "pipeline.stages.train", *LONG, *overrides,
               f"tracking.uri={server.url}",
               f"paths.prepared_dir={prepared_dir}", f"paths.models_dir={work / 'models'}",
               f"paths.metrics_dir={work / 'metrics'}"]
    work.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(command, cwd=work, env=clean_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def first_checkpoint(server, process: subprocess.Popen, timeout: float = 120):
    """The training's run, once its first checkpoint reached the server."""
    client = MlflowClient(server.url)
    deadline = time.monotonic() + timeout
    while True:
        experiments = [e.experiment_id for e in client.search_experiments()]
        found = [r for r in client.search_runs(experiments, "attributes.status = 'RUNNING'")
                 if "val_loss" in r.data.metrics]
        if found:
            return found[0]
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the training's first checkpoint never arrived"
        time.sleep(0.2)


def finish(process: subprocess.Popen, timeout: float) -> str:
    try:
        return process.communicate(timeout=timeout)[1]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
            process.wait()


def assert_outputs_written(work: Path, tracking: str) -> None:
    model = work / "models" / "uni"
    assert {"best.npz", "last.npz", "config.yaml", "run.json"} <= {p.name for p in model.iterdir()}
    assert json.loads((model / "run.json").read_text())["tracking"] == tracking
    assert (work / "metrics" / "train_uni.json").is_file()
    assert (work / "metrics" / "history_uni.csv").is_file()


def assert_could_not_complete(stderr: str, run_id: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith(f"error: run {run_id} could not be completed: "), lines[0]
    assert "the model is saved in" in lines[0]
    assert "to record the run, rerun when the tracking store answers: python -m " \
           "pipeline.stages.train experiment=quick" in lines[0]


def test_a_server_killed_mid_training_costs_no_training(prepared_dir, tmp_path):
    with mlflow_server(tmp_path / "server") as server:
        process = start_training(server, prepared_dir, tmp_path / "work")
        run = first_checkpoint(server, process)
        server.kill()
        killed = time.monotonic()
        stderr = finish(process, timeout=240)  # MLflow's own retries: about 8 minutes
        after_kill = time.monotonic() - killed
    assert process.returncode == 1, stderr[-3000:]
    assert_could_not_complete(stderr, run.info.run_id)
    assert_outputs_written(tmp_path / "work", "incomplete")
    assert after_kill < 90, after_kill  # the rest of the training, and seconds of failing calls


@pytest.mark.slow  # two trainings (about 40 s) and a frozen server
def test_a_frozen_server_holds_training_for_about_thirty_seconds_at_most(prepared_dir, tmp_path):
    with mlflow_server(tmp_path / "server") as server:
        started = time.monotonic()
        baseline = start_training(server, prepared_dir, tmp_path / "baseline")
        assert finish(baseline, timeout=300) is not None and baseline.returncode == 0
        undisturbed = time.monotonic() - started

        started = time.monotonic()
        process = start_training(server, prepared_dir, tmp_path / "work")
        run = first_checkpoint(server, process)
        server.freeze()
        stderr = finish(process, timeout=300)
        disturbed = time.monotonic() - started
        server.thaw()
    assert process.returncode == 1, stderr[-3000:]
    assert_could_not_complete(stderr, run.info.run_id)
    assert_outputs_written(tmp_path / "work", "incomplete")
    assert disturbed - undisturbed < 30 + 15, (disturbed, undisturbed)  # budget + machine noise


@pytest.mark.slow  # a training that outlasts a server restart (about a minute)
def test_a_server_back_before_the_end_of_training_gets_the_whole_run(prepared_dir, tmp_path):
    with mlflow_server(tmp_path / "server") as server:
        process = start_training(server, prepared_dir, tmp_path / "work", "train.epochs=500")
        run = first_checkpoint(server, process)
        server.kill()
        time.sleep(2)
        server.start()  # same port, same store
        stderr = finish(process, timeout=300)
        assert process.returncode == 0, stderr[-3000:]
        client = MlflowClient(server.url)
        ended = client.get_run(run.info.run_id)
        history = client.get_metric_history(run.info.run_id, CHECKPOINT_METRICS[0])
    history_csv = tmp_path / "work" / "metrics" / "history_uni.csv"
    checkpoints = len(history_csv.read_text().splitlines()) - 1
    assert ended.info.status == "FINISHED"
    assert len(history) == checkpoints  # the values kept while it was down were sent
    assert_outputs_written(tmp_path / "work", "complete")


# ------------------------------------------------------------------------ deleted in the store
def _store(tmp_path: Path) -> tuple[str, MlflowClient, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    return uri, client, client.create_experiment("x", artifact_location=(tmp_path / "a").as_uri())


def test_evaluate_records_a_model_of_a_deleted_run_into_a_new_run(tmp_path, prepared_dir):
    """Results written into a deleted run would vanish from the UI (and go with it at
    `mlflow gc`): evaluate records them into a run of their own and says how to restore."""
    uri, client, experiment = _store(tmp_path)
    run_id = client.create_run(experiment).info.run_id
    client.delete_run(run_id)
    folder = tmp_path / "models" / "uni"  # a model evaluate would otherwise test into the run
    model = build_model("uni", seed=1, hidden_size=8)
    model.save(folder / "best.npz")
    model.save(folder / "last.npz")
    (folder / "config.yaml").write_text(
        "dataset: mnist\nname: uni\nmodel: {kind: uni, hidden_size: 8}\ntrain: {seed: 1}\n"
        "tracking: {experiment_name: x}\n")
    (folder / "run.json").write_text(json.dumps(
        {"run_id": run_id, "dataset": "mnist",
         "data_sha256": prepared_data.fingerprint(prepared_data.read_meta(prepared_dir))}))
    result = stage("evaluate", "models=[uni]", f"paths.prepared_dir={prepared_dir}",
                   f"paths.models_dir={tmp_path / 'models'}",
                   f"paths.metrics_dir={tmp_path / 'metrics'}",
                   f"paths.evaluation_dir={tmp_path / 'evaluation'}", f"tracking.uri={uri}",
                   timeout=120)
    assert result.returncode == 0, result.stderr
    [line] = [line for line in (result.stdout + result.stderr).splitlines() if "WARNING" in line]
    assert (f"{folder}: its training run {run_id} is deleted in tracking store {uri} (restore "
            f"it with MLFLOW_TRACKING_URI={uri} mlflow runs restore --run-id {run_id} to record "
            "there); recording its evaluation in a new run") in line
    assert "of experiment 'x'" in line  # the model's, from its config.yaml
    assert client.get_run(run_id).data.metrics == {}
    [new] = client.search_runs([experiment], "tags.stage = 'evaluate'")
    assert new.info.run_name.startswith("uni-mnist-seed1 (weights ")
    assert (tmp_path / "metrics" / "test.json").is_file()


def test_compare_refuses_a_deleted_registered_model_before_moving_any_alias(tmp_path):
    uri, client, experiment = _store(tmp_path)
    results = {"loss": 0.5, "accuracy": 0.9}
    test = {}
    for name in ("uni", "bi"):  # what train and evaluate leave, without training
        run_id = client.create_run(experiment, tags={"preset": "book",
                                                     "dataset": "mnist"}).info.run_id
        for metric in ("test_acc_best", "test_acc_last"):
            client.log_metric(run_id, metric, results["accuracy"])
        for metric in ("test_loss_best", "test_loss_last"):
            client.log_metric(run_id, metric, results["loss"])
        registered = f"birnn-mnist-{name}"
        client.create_registered_model(registered)
        for _ in range(2):  # version 1 holds the alias, version 2 is this run's
            version = client.create_model_version(registered, f"runs:/{run_id}/model",
                                                  run_id=run_id).version
        client.set_registered_model_alias(registered, "book", "1")
        model_dir = tmp_path / "models" / name
        model_dir.mkdir(parents=True)
        (model_dir / "config.yaml").write_text(
            f"dataset: mnist\nname: {name}\ntrain: {{seed: 0}}\ntracking: {{experiment_name: x}}\n")
        sizes = {"hidden_size": 4} if name == "uni" else {"hidden_fwd": 4, "hidden_bwd": 4}
        build_model(name, seed=0, **sizes).save(model_dir / "best.npz")
        (model_dir / "run.json").write_text(json.dumps(
            {"run_id": run_id, "registered_model": registered, "model_version": int(version)}))
        (tmp_path / "metrics").mkdir(exist_ok=True)
        (tmp_path / "metrics" / f"history_{name}.csv").write_text("epoch,val_loss\n1,0.5\n")
        (tmp_path / "metrics" / f"train_{name}.json").write_text(
            json.dumps({"best_epoch": 1, "best_iteration": 10}))
        (tmp_path / "evaluation" / name).mkdir(parents=True)
        (tmp_path / "evaluation" / name / "details.json").write_text(
            json.dumps({"best": {"confusion": [[1]]}}))
        test[name] = {"param_count": 10, "best": results, "last": results}
    (tmp_path / "metrics" / "test.json").write_text(json.dumps(test))
    client.delete_registered_model("birnn-mnist-bi")

    result = stage("compare", f"paths.models_dir={tmp_path / 'models'}",
                   f"paths.metrics_dir={tmp_path / 'metrics'}",
                   f"paths.evaluation_dir={tmp_path / 'evaluation'}",
                   f"paths.reports_dir={tmp_path / 'reports'}", f"tracking.uri={uri}",
                   timeout=120)
    assert result.returncode == 1
    assert error_lines(result) == [
        f"error: {tmp_path / 'models' / 'bi' / 'run.json'}: registered model birnn-mnist-bi "
        f"version 2 is not in tracking store {uri} (deleted?): retrain to register a new "
        "version: python -m pipeline.stages.train dataset=mnist model=bi, then python -m "
        "pipeline.stages.evaluate dataset=mnist and python -m pipeline.stages.compare "
        "dataset=mnist"], result.stderr
    assert int(client.get_model_version_by_alias("birnn-mnist-uni", "book").version) == 1
    assert not (tmp_path / "reports").exists()
    assert [r.info.run_name for r in client.search_runs([experiment])
            if r.data.tags.get("stage") == "compare"] == []
