"""MLflow tracking: an unusable store fails fast, metrics are batched, a failed run is marked.

Each test that needs a store uses its own SQLite file under tmp_path.
"""

from __future__ import annotations

import socket
import time

import pytest
from omegaconf import OmegaConf

from pipeline.guard.errors import StageError
from pipeline.tracking import metrics, runs, store
from pipeline_testkit import ROOT, error_lines, free_port, stage


def tracking_cfg(uri: str | None, timeout: int = 2):
    return OmegaConf.create({"uri": uri, "experiment_name": "tests",
                             "probe_timeout_seconds": timeout, "flush_every_seconds": 0})


def test_default_store_is_sqlite_at_the_project_root_whatever_the_cwd(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert store.tracking_uri(tracking_cfg(None)) == f"sqlite:///{ROOT / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example.invalid:5000")
    assert store.tracking_uri(tracking_cfg(None)) == "http://example.invalid:5000"
    assert store.tracking_uri(tracking_cfg("sqlite:////x/y.db")) == "sqlite:////x/y.db"


def test_dvc_experiment_copies_share_the_original_store(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # what DVC sets for queued/--temp runs
    assert store.tracking_uri(tracking_cfg(None)) == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_unreachable_server_fails_within_seconds():
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(StageError, match="tracking store http://127.0.0.1:.* is not usable"):
        store.connect(tracking_cfg(uri))
    assert time.monotonic() - started < 5


def test_silent_server_fails_after_the_probe_timeout():
    # Accepts TCP connections (the kernel's backlog) but never answers an HTTP request:
    # only the probe's read timeout stops the wait.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(StageError, match="is not usable"):
            store.connect(tracking_cfg(uri, timeout=2))
        elapsed = time.monotonic() - started
    assert 1.5 < elapsed < 8, elapsed


def test_entry_point_reports_an_unreachable_server_in_one_line_within_seconds():
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = stage("train", "experiment=quick", f"tracking.uri={uri}", timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith(f"error: tracking store {uri} is not usable")
    # Interpreter and imports included (25 s once on 2 loaded cores), so the bound is loose;
    # MLflow's own retries would take minutes. The probe's bound itself: the test above.
    assert elapsed < 45, elapsed


def test_flatten_gives_dotted_params():
    cfg = OmegaConf.create({"model": {"lr": 0.01, "lr_milestones": {30: 0.008}, "m": {}},
                            "models": ["uni", "bi"], "name": "${model.lr}"})
    assert runs.flatten(cfg) == {"model.lr": "0.01", "model.lr_milestones.30": "0.008",
                                     "model.m": "{}", "models": '["uni", "bi"]', "name": "0.01"}


class RecordingClient:
    def __init__(self):
        self.batches = []

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self.batches.append(list(metrics))


def test_metric_buffer_sends_batches_not_single_values():
    client = RecordingClient()
    buffer = metrics.MetricBuffer(client, "run", flush_every_seconds=3600)
    for step in range(200):
        buffer.add({"val_loss": 1.0 / (step + 1), "lr": 0.01}, step=step * 215 + 214)
    assert client.batches == []  # nothing sent before the interval or the final flush
    buffer.flush()
    assert len(client.batches) == 1 and buffer.values_sent == 400
    sent = {(m.key, m.step): m.value for m in client.batches[0]}
    assert sent[("val_loss", 214)] == 1.0 and sent[("lr", 199 * 215 + 214)] == 0.01


def test_metric_buffer_flushes_when_the_interval_has_passed():
    client = RecordingClient()
    buffer = metrics.MetricBuffer(client, "run", flush_every_seconds=0)
    buffer.add({"val_loss": 1.0}, step=1)
    buffer.add({"val_loss": 0.5}, step=2)
    assert [len(batch) for batch in client.batches] == [1, 1]


def test_a_failed_run_is_marked_failed_with_the_error(tmp_path):
    client = store.connect(tracking_cfg(f"sqlite:///{tmp_path / 'mlflow.db'}"))
    with pytest.raises(RuntimeError):
        with runs.new_run(client, "tests", "uni", {"model_kind": "uni"}) as run_id:
            raise RuntimeError("loss became nan at epoch 3, iteration 1300")
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "loss became nan at epoch 3, iteration 1300"
    assert run.data.tags["model_kind"] == "uni" and run.info.run_name == "uni"


def test_a_report_links_the_runs_it_compared_without_nesting_them(tmp_path):
    client = store.connect(tracking_cfg(f"sqlite:///{tmp_path / 'mlflow.db'}"))
    children = []
    for name in ("uni", "bi"):
        with runs.new_run(client, "tests", name, {}) as run_id:
            children.append(run_id)
    with runs.new_run(client, "tests", "table-19-12", {}) as report:
        runs.link_report(client, report, children)
    for child in children:
        tags = client.get_run(child).data.tags
        assert tags[runs.REPORT_TAG] == report and runs.PARENT_TAG not in tags  # not folded
    assert client.get_run(report).data.tags[runs.COMPARED_TAG] == ",".join(children)


def test_a_training_run_is_named_by_model_dataset_and_seed():
    assert runs.training_run_name("bi", "fashion_mnist", 3) == "bi-fashion_mnist-seed3"


class FlakyClient:
    """Raises MLflow's wrapping of SQLite's lock error ``locked`` times, then answers."""

    tracking_uri = "sqlite:////x.db"

    def __init__(self, locked: int, error: str = "(sqlite3.OperationalError) database is locked"):
        self.locked, self.error, self.calls = locked, error, 0

    def log_batch(self, run_id, metrics=()):
        from mlflow.exceptions import MlflowException

        self.calls += 1
        if self.calls <= self.locked:
            raise MlflowException(self.error)
        return run_id


def test_lock_errors_are_retried_with_growing_waits():
    waits = []
    client = store.StoreClient(FlakyClient(locked=3), attempts=8, first_wait=0.2,
                                         max_wait=5.0, sleep=waits.append)
    assert client.log_batch("run", metrics=[]) == "run"
    assert client._client.calls == 4 and len(waits) == 3
    for attempt, wait in enumerate(waits):  # 0.2, 0.4, 0.8, each jittered by +-50%
        assert 0.1 * 2 ** attempt <= wait <= 0.3 * 2 ** attempt
    assert client.tracking_uri == "sqlite:////x.db"  # attributes pass through


def test_lock_retries_are_bounded():
    from mlflow.exceptions import MlflowException

    waits = []
    client = store.StoreClient(FlakyClient(locked=100), attempts=5, sleep=waits.append)
    with pytest.raises(MlflowException, match="database is locked"):
        client.log_batch("run")
    assert client._client.calls == 5 and len(waits) == 4
    assert max(waits) <= 5.0 * 1.5


def test_other_errors_are_not_retried():
    from mlflow.exceptions import MlflowException

    waits = []
    client = store.StoreClient(FlakyClient(locked=1, error="run xyz not found"),
                                         sleep=waits.append)
    with pytest.raises(MlflowException, match="not found"):
        client.log_batch("run")
    assert client._client.calls == 1 and waits == []


def test_connect_returns_a_lock_retrying_client(tmp_path):
    client = store.connect(tracking_cfg(f"sqlite:///{tmp_path / 'mlflow.db'}"))
    assert isinstance(client, store.StoreClient)


CONNECT_AT = """
import sys, time
from omegaconf import OmegaConf
from pipeline.tracking import store
cfg = OmegaConf.create({"uri": sys.argv[1], "experiment_name": "race",
                        "probe_timeout_seconds": 30, "flush_every_seconds": 0})
while time.time() < float(sys.argv[2]):
    time.sleep(0.002)
client = store.connect(cfg)
print("experiment", store.experiment_id(client, "race"))
"""


def test_processes_opening_a_fresh_sqlite_store_at_once_all_succeed(tmp_path):
    # Without the lock around first contact, 2 of 3 such processes failed in MLflow's schema
    # migration ('duplicate column name: step') in every trial.
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    start_at = str(time.time() + 3)  # after every interpreter has imported MLflow
    procs = [subprocess.Popen([sys.executable, "-c", CONNECT_AT, uri, start_at], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-500:] for _, err in outputs]
    experiment_ids = {out.split()[-1] for out, _ in outputs}
    assert len(experiment_ids) == 1  # one experiment, created once


class DatasetRaceClient:
    """log_inputs fails the first ``failures`` times with ``error``, as MLflow's SQL store does
    when a parallel job inserted the same dataset between its lookup and its insert."""

    def __init__(self, error: str, failures: int = 1):
        self.error, self.failures, self.calls = error, failures, []

    def log_inputs(self, run_id, datasets=None, models=None):
        from mlflow.exceptions import MlflowException

        self.calls.append([d.dataset.name for d in datasets])
        if len(self.calls) <= self.failures:
            raise MlflowException(self.error)


def test_a_dataset_logged_by_a_parallel_job_at_once_is_linked_on_a_second_try():
    race = ("BAD_REQUEST: (psycopg.errors.UniqueViolation) duplicate key value violates unique "
            'constraint "dataset_pk" DETAIL: Key (experiment_id, name, digest)=(1, mnist-train, '
            "d2377a82b04fe4c9) already exists.")
    client = DatasetRaceClient(race)
    runs.log_data_inputs(client, "r", "data/raw/mnist", "f" * 64, {"train": ("mnist-train", 9)})
    assert client.calls == [["mnist-train"], ["mnist-train"]]

    with pytest.raises(Exception, match="dataset_pk"):      # at most one retry
        runs.log_data_inputs(DatasetRaceClient(race, failures=2), "r", "data/raw/mnist",
                             "f" * 64, {"train": ("mnist-train", 9)})
    other = DatasetRaceClient("RESOURCE_DOES_NOT_EXIST: run r not found")
    with pytest.raises(Exception, match="not found"):       # other errors: not retried
        runs.log_data_inputs(other, "r", "data/raw/mnist", "f" * 64, {"train": ("t", 9)})
    assert len(other.calls) == 1
