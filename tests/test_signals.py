"""No run is left RUNNING (issue 7, class 3): SIGTERM and SIGHUP end a stage as Ctrl-C does
(its run KILLED, one line, exit 128 + the signal); a sweep whose worker process is killed ends
in one line naming the jobs, its runs marked; a run whose process was killed with SIGKILL is
ended KILLED by the next command, never one of a live process or of another host.

Every stage here tracks into its own SQLite file and is stopped while it trains (a long
training of a few samples, metrics sent at every checkpoint so that the test sees it started).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from pipeline.tracking import stale_runs, store
from pipeline_testkit import clean_env, run

LONG = ("experiment=quick", "train.epochs=1000", "train.train_limit=500", "train.val_limit=100",
        "train.batch_size=100", "tracking.flush_every_seconds=0")


def start(tmp_path: Path, prepared_dir: Path, *overrides: str,
          preexec_fn=None) -> subprocess.Popen:
    """A training stage in its own process group, tracking into tmp_path/mlflow.db, with the
    default disposition of SIGHUP and SIGTERM (or what ``preexec_fn`` sets)."""
    flags = [o for o in overrides if o.startswith("-")]  # (before the overrides: argparse)
    overrides = tuple(o for o in overrides if not o.startswith("-"))
    # A sweep's jobs write under their own folders (and refuse paths.models_dir elsewhere).
    outputs = () if "-m" in flags else (f"paths.models_dir={tmp_path / 'models'}",
                                        f"paths.metrics_dir={tmp_path / 'metrics'}")
    command = [sys.executable, "-m", "pipeline.stages.train", *flags, *LONG,
               f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
               f"paths.prepared_dir={prepared_dir}", *outputs, *overrides]
    return subprocess.Popen(command, cwd=tmp_path, env=clean_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=preexec_fn or default_stop_signals)


def default_stop_signals() -> None:
    """The stage starts with the default disposition of the signals under test, however
    pytest was started: under `nohup` SIGHUP is inherited ignored, and the stage rightly
    keeps ignoring it (test_a_stage_started_under_nohup_ignores_sighup)."""
    for signum in (signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


def training_runs(client: MlflowClient, count: int, process: subprocess.Popen,
                  timeout: float = 120) -> list:
    """Wait until ``count`` training runs have sent a checkpoint; return them by job number."""
    deadline = time.monotonic() + timeout
    while True:
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = [r for r in client.search_runs(experiments, "attributes.status = 'RUNNING'")
                if "val_loss" in r.data.metrics] if experiments else []
        if len(runs) >= count:
            return sorted(runs, key=lambda r: int(r.data.tags.get("sweep_job", 0)))
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.3)


def stop_group(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def group_gone(group: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("signum, code", [
    (signal.SIGTERM, 143),
    pytest.param(signal.SIGHUP, 129, marks=pytest.mark.slow),  # the same path as SIGTERM
])
def test_sigterm_and_sighup_end_the_run_killed_in_one_line(prepared_dir, tmp_path, signum, code):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    process = start(tmp_path, prepared_dir)
    try:
        (running,) = training_runs(client, 1, process)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    finally:
        stop_group(process)
    name = signal.Signals(signum).name
    assert process.returncode == code, stderr[-3000:]
    assert [line for line in stderr.splitlines() if line.strip()] == [f"error: terminated ({name})"]
    ended = client.get_run(running.info.run_id)
    assert ended.info.status == "KILLED" and ended.data.tags["error"] == f"terminated ({name})"
    # No model folder, no staging folder: training never finished.
    assert not (tmp_path / "models").exists() or list((tmp_path / "models").iterdir()) == []


@pytest.mark.slow
def test_a_stage_started_under_nohup_ignores_sighup(prepared_dir, tmp_path):
    def as_nohup() -> None:
        default_stop_signals()
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    process = start(tmp_path, prepared_dir, preexec_fn=as_nohup)
    try:
        (running,) = training_runs(client, 1, process)
        process.send_signal(signal.SIGHUP)
        time.sleep(3)
        assert process.poll() is None  # still training
        assert client.get_run(running.info.run_id).info.status == "RUNNING"
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        stop_group(process)
    assert process.returncode == 143, stderr[-3000:]
    assert client.get_run(running.info.run_id).info.status == "KILLED"


def test_a_killed_process_s_run_is_ended_by_the_stale_runs_command(prepared_dir, tmp_path):
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(db)
    process = start(tmp_path, prepared_dir)
    try:
        (running,) = training_runs(client, 1, process)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
    finally:
        stop_group(process)
    run_id = running.info.run_id
    assert client.get_run(run_id).info.status == "RUNNING"  # nothing could end it
    assert running.data.tags[stale_runs.PID_TAG] == str(process.pid)

    assert [r.info.run_id for r in stale_runs.find_stale_runs(client)] == [run_id]
    command = [sys.executable, "-m", "pipeline.commands.close_stale_runs", "--tracking-uri", db]
    closed = run(command, cwd=tmp_path, timeout=60)
    assert closed.returncode == 0 and f"{run_id} 'uni' (pid {process.pid}): ended KILLED" \
        in closed.stdout, closed.stderr
    ended = client.get_run(run_id)
    assert ended.info.status == "KILLED"
    assert f"process {process.pid} on {socket.gethostname()} ended" in ended.data.tags["error"]


def test_a_stage_start_ends_runs_of_dead_processes_only(tmp_path):
    # Runs owned by: a process that has exited; this (live) process; a live process that
    # reuses a dead one's pid (same pid, another start time); another host; this host after
    # a reboot (another boot id); nobody recorded.
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(db)
    experiment = client.create_experiment("stale")
    exited = subprocess.Popen(["true"])
    exited.wait()
    mine = stale_runs.process_tags()
    boot, namespace, ticks = mine[stale_runs.START_TAG].rsplit("/", 2)
    owners = {
        "exited": {**mine, stale_runs.PID_TAG: str(exited.pid)},
        "live": mine,
        "reused pid": {**mine, stale_runs.START_TAG: f"{boot}/{namespace}/{int(ticks) - 1}"},
        "other host": {**mine, stale_runs.HOST_TAG: "elsewhere",
                       stale_runs.PID_TAG: str(exited.pid)},
        "rebooted": {**mine, stale_runs.PID_TAG: str(exited.pid),
                     stale_runs.START_TAG: f"another-boot/{namespace}/{ticks}"},
        "untagged": {},
    }
    ids = {name: client.create_run(experiment, tags=tags, run_name=name).info.run_id
           for name, tags in owners.items()}

    store.connect(OmegaConf.create({"uri": db, "probe_timeout_seconds": 5}))

    status = {name: client.get_run(run_id).info.status for name, run_id in ids.items()}
    assert status == {"exited": "KILLED", "live": "RUNNING", "reused pid": "KILLED",
                      "other host": "RUNNING", "rebooted": "RUNNING", "untagged": "RUNNING"}


def sweep_runs(client: MlflowClient, role: str) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, f"tags.sweep_role = '{role}'")


def test_a_dead_sweep_worker_ends_the_sweep_in_one_line_naming_the_job(prepared_dir, tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    sweep_dir = tmp_path / "multirun" / "dead-worker"
    process = start(tmp_path, prepared_dir, "-m", "hydra/launcher=joblib",
                    "hydra.launcher.n_jobs=2", "model=uni,bi", f"hydra.sweep.dir={sweep_dir}")
    try:
        jobs = training_runs(client, 2, process)
        victim = jobs[1]  # job 1: model=bi
        os.kill(int(victim.data.tags[stale_runs.PID_TAG]), signal.SIGKILL)
        _, stderr = process.communicate(timeout=120)
    finally:
        stop_group(process)
    assert process.returncode == 1, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith("error: sweep ") and \
        "a worker process died (exit code SIGKILL(-9))" in lines[0], lines[0]
    assert "job 1 (model=bi)" in lines[0]
    assert {r.info.status for r in sweep_runs(client, "job")} == {"KILLED"}
    (parent,) = sweep_runs(client, "parent")
    assert parent.info.status == "FAILED" and parent.data.tags["error"] == lines[0][len("error: "):]
    assert group_gone(process.pid), "processes of the sweep are left"


@pytest.mark.slow  # the sweep's side of what the single-run test checks (about 30 s)
def test_sigterm_to_a_sweep_ends_its_runs_and_its_workers(prepared_dir, tmp_path):
    # What `timeout` and SLURM do: the signal goes to the launching process only.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    process = start(tmp_path, prepared_dir, "-m", "hydra/launcher=joblib",
                    "hydra.launcher.n_jobs=2", "model=uni,bi",
                    f"hydra.sweep.dir={tmp_path / 'multirun' / 'terminated'}")
    try:
        training_runs(client, 2, process)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        stop_group(process)
    assert process.returncode == 143, stderr[-3000:]
    assert [line for line in stderr.splitlines() if line.strip()] == \
        ["error: terminated (SIGTERM)"]
    runs = sweep_runs(client, "job") + sweep_runs(client, "parent")
    assert [r.info.status for r in runs] == ["KILLED"] * 3
    assert group_gone(process.pid), "processes of the sweep are left"


def test_a_stop_signal_waits_for_the_tracking_store_call_in_progress():
    # Raised in the middle of a store call, the interrupt could leave a SQLite write
    # transaction open, and ending the run KILLED would then wait on its lock.
    from pipeline import interrupts

    handled = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    previous = {signum: signal.getsignal(signum) for signum in handled}
    interrupts.install_signal_handlers()
    try:
        finished = []
        with pytest.raises(interrupts.Terminated):
            with interrupts.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)  # the handler has run by now, and held the signal
                finished.append(True)
        assert finished == [True]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
