"""A shared tracking server: MLflow's server on PostgreSQL, fed by a parallel sweep.

The fixture starts a throwaway PostgreSQL cluster and ``mlflow server`` on 127.0.0.1 (both on
free ports, in a temporary folder; scripts/local_tracking_server.py) and stops both whatever
happens. Skipped only when the PostgreSQL server binaries are not installed.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline_testkit import CHECKPOINT_METRICS, ROOT, TINY, error_lines, free_port, stage

spec = importlib.util.spec_from_file_location(
    "local_tracking_server", ROOT / "scripts" / "local_tracking_server.py")
server_script = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(server_script)

EXPERIMENT = "server-test"


needs_postgres = pytest.mark.skipif(
    server_script.find_pg_bin() is None,
    reason="PostgreSQL server binaries (initdb, postgres) not installed: "
           "apt-get install postgresql (.ci/run does), or set PG_BIN")


@pytest.fixture(scope="module")
def server():
    with server_script.tracking_server() as running:  # stops both servers on any exit
        yield running


def training_runs(client: MlflowClient) -> list:
    """The experiment's training runs (a sweep may add a parent run without metrics)."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None, f"experiment {EXPERIMENT!r} never reached the server"
    return [r for r in client.search_runs([experiment.experiment_id]) if "val_loss" in r.data.metrics]


@needs_postgres
def test_parallel_sweep_lands_in_postgresql_through_the_server(server, prepared_dir, tmp_path):
    started = time.monotonic()
    result = stage("train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                   "tracking=server", "model=uni,bi", *TINY,
                   f"tracking.experiment_name={EXPERIMENT}",
                   f"paths.prepared_dir={prepared_dir}", f"hydra.sweep.dir={tmp_path / 'multirun'}",
                   timeout=180, MLFLOW_TRACKING_URI=server.uri)  # tracking=server reads this
    assert result.returncode == 0, result.stderr[-3000:]
    elapsed = time.monotonic() - started

    client = MlflowClient(tracking_uri=server.uri)
    runs = training_runs(client)
    assert sorted(r.data.params["model.kind"] for r in runs) == ["bi", "uni"], elapsed
    for run in runs:
        assert run.info.status == "FINISHED"
        for key in CHECKPOINT_METRICS:  # every checkpoint of every run, in order
            history = client.get_metric_history(run.info.run_id, key)
            assert [m.step for m in history] == [4, 9], (key, history)
        assert 0.0 < run.data.metrics["best_val_acc"] <= 1.0
        assert run.data.params["data.train_samples"] == "1000"
        # Artifacts are uploaded through the server to its --artifacts-destination.
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"best.npz", "history.csv", "run.json"} <= names
        stored = list(server.artifacts.rglob(f"{run.info.run_id}/**/best.npz"))
        assert len(stored) == 1, list(server.artifacts.rglob("*"))
        local = tmp_path / run.info.run_id
        local.mkdir()
        run_json = client.download_artifacts(run.info.run_id, "run.json", str(local))
        assert json.loads(Path(run_json).read_text())["tracking_uri"] == server.uri

    # ... and the server's store really is the PostgreSQL database.
    import psycopg

    backend = server.backend_uri.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(backend) as conn:
        stored_runs = dict(conn.execute(
            "SELECT run_uuid, status FROM runs WHERE run_uuid = ANY(%s)",
            ([r.info.run_id for r in runs],)).fetchall())
        n_values = conn.execute("SELECT count(*) FROM metrics WHERE run_uuid = ANY(%s)",
                                ([r.info.run_id for r in runs],)).fetchone()[0]
    assert stored_runs == {r.info.run_id: "FINISHED" for r in runs}
    assert n_values >= 2 * 2 * len(CHECKPOINT_METRICS)


def test_server_config_without_a_uri_stops_in_one_line(tmp_path):
    result = stage("train", "tracking=server", *TINY, f"paths.models_dir={tmp_path}",
                   timeout=60)
    assert result.returncode == 1
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: config error: tracking.uri:")
    assert "MLFLOW_TRACKING_URI" in lines[0]
    assert not (tmp_path / "uni").exists()


def test_server_config_with_nothing_listening_names_the_uri(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = stage("train", "tracking=server", f"tracking.uri={uri}", *TINY,
                   f"paths.models_dir={tmp_path}", timeout=60)
    assert result.returncode == 1
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith(f"error: tracking store {uri} is not usable")
    assert time.monotonic() - started < 30


@needs_postgres
def test_a_server_that_cannot_start_fails_in_bounded_time_and_leaves_nothing():
    # The MLflow server's port is taken: it exits, and the helper must say so (naming its
    # log) and stop the PostgreSQL it had started, and delete its folder.
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        started = time.monotonic()
        with pytest.raises(server_script.ServerError, match="mlflow server exited") as error:
            with server_script.tracking_server(port=taken.getsockname()[1]):
                pytest.fail("the server should not have started")
    assert time.monotonic() - started < 90
    assert "address already in use" in str(error.value)  # the log tail says why
    workdir = Path(str(error.value).split("(log ")[1].split(")")[0]).parent
    assert workdir.name.startswith("birnn-tracking-") and not workdir.exists()
    left = [p for p in Path("/proc").iterdir() if p.name.isdigit()
            and str(workdir).encode() in _cmdline(p)]
    assert left == []


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:  # exited meanwhile
        return b""
