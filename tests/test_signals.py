"""No run is left RUNNING (issue 7, class 3): SIGTERM and SIGHUP end a stage as Ctrl-C does
(its run KILLED, one line, exit 128 + the signal); a sweep whose worker process is killed ends
in one line naming the jobs, its runs marked; a run whose process was killed with SIGKILL is
ended KILLED by the next command, never one of a live process or of another host.

Every stage here tracks into its own SQLite file and is stopped while it trains (a long
training of a few samples, metrics sent at every checkpoint so that the test sees it started).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from pipeline.guard import interrupts
from pipeline.tracking import runs, stale_runs, store
from pipeline_testkit import TINY, clean_env, run

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
    assert closed.returncode == 0 and f"{run_id} 'uni-mnist-seed0' (pid {process.pid}): ended KILLED" \
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


@pytest.fixture
def stop_signal_handlers(monkeypatch):
    """The stages' handlers in this process, for one test; then the previous ones again."""
    handled = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    previous = {signum: signal.getsignal(signum) for signum in handled}
    for name in ("_received", "_pending", "_stopping"):  # restored after the test
        monkeypatch.setattr(interrupts, name, getattr(interrupts, name))
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    interrupts.install_signal_handlers()
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def test_a_stop_signal_waits_for_the_tracking_store_call_in_progress(stop_signal_handlers):
    # Raised in the middle of a store call, the interrupt could leave a SQLite write
    # transaction open, and ending the run KILLED would then wait on its lock.
    finished = []
    with pytest.raises(interrupts.Terminated):
        with interrupts.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the handler has run by now, and held the signal
            finished.append(True)
    assert finished == [True]


def test_a_stop_signal_python_drops_still_ends_the_run_killed(stop_signal_handlers, tmp_path,
                                                               capfd):
    # During MLflow's model logging a signal can arrive while a weakref callback of
    # SQLAlchemy runs: Python prints the KeyboardInterrupt raised there ("Exception ignored
    # in ...") and drops it, and the run went on to end FINISHED, exit 0.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    class Collected:
        pass

    def signalled_while_collected(ref) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # the handler raises here, inside the callback

    with pytest.raises(interrupts.Terminated):
        with runs.new_run(client, "tests", "uni", {}) as run_id:
            collected = Collected()
            watcher = weakref.ref(collected, signalled_while_collected)
            del collected  # the callback runs; its exception is dropped
            assert watcher() is None
    ended = client.get_run(run_id)
    assert ended.info.status == "KILLED" and ended.data.tags["error"] == "terminated (SIGTERM)"
    assert "Exception ignored" not in capfd.readouterr().err


def test_a_second_stop_signal_does_not_cut_the_clean_up_short(stop_signal_handlers, tmp_path):
    # Ctrl-C twice: the second arrived while the first one's clean-up ended the run KILLED,
    # and left it RUNNING.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    class SignalledDuringCleanUp(MlflowClient):
        def set_tag(self, *args, **kwargs):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)  # the handler has run by now
            return super().set_tag(*args, **kwargs)

    with pytest.raises(KeyboardInterrupt):
        with runs.new_run(SignalledDuringCleanUp(client.tracking_uri), "tests", "uni",
                          {}) as run_id:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    ended = client.get_run(run_id)
    assert ended.info.status == "KILLED" and ended.data.tags["error"] == "interrupted"


def test_a_stop_signal_during_model_logging_ends_the_run_killed(prepared_dir, tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    command = [sys.executable, "-m", "pipeline.stages.train", *TINY,
               f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
               f"paths.prepared_dir={prepared_dir}", f"paths.models_dir={tmp_path / 'models'}",
               f"paths.metrics_dir={tmp_path / 'metrics'}"]
    process = subprocess.Popen(command, cwd=tmp_path, env=clean_env(), text=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True, preexec_fn=default_stop_signals)
    try:
        deadline = time.monotonic() + 120
        while True:  # the tag set just before the model is logged
            experiments = [e.experiment_id for e in client.search_experiments()]
            found = client.search_runs(experiments, "tags.metric_logging_seconds != ''") \
                if experiments else []
            if found:
                break
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "training did not end"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        stop_group(process)
    assert process.returncode == 143, stderr[-3000:]
    assert [line for line in stderr.splitlines() if line.strip()] == \
        ["error: terminated (SIGTERM)"]
    assert client.get_run(found[0].info.run_id).info.status == "KILLED"


def test_two_quick_sigints_end_the_run_killed_with_the_first_ones_code(prepared_dir, tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    process = start(tmp_path, prepared_dir)
    try:
        (running,) = training_runs(client, 1, process)
        process.send_signal(signal.SIGINT)
        time.sleep(0.001)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        stop_group(process)
    assert process.returncode == 130, stderr[-3000:]
    assert [line for line in stderr.splitlines() if line.strip()] == ["error: interrupted"]
    assert client.get_run(running.info.run_id).info.status == "KILLED"


def process_gone(pid: int, timeout: float) -> bool:
    """Whether ``pid`` exited (a zombie nobody reaps counts) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


def test_sweep_workers_exit_when_the_sweep_process_is_killed(prepared_dir, tmp_path):
    # kill -9 of a joblib sweep's process: its workers trained on, then waited forever for
    # their next job, keeping loky's resource trackers alive and the command's stderr open
    # (a `| tee` reading it never ended).
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    process = start(tmp_path, prepared_dir, "-m", "hydra/launcher=joblib",
                    "hydra.launcher.n_jobs=2", "model=uni,bi",
                    f"hydra.sweep.dir={tmp_path / 'multirun' / 'orphans'}")
    try:
        jobs = training_runs(client, 2, process)
        workers = [int(job.data.tags[stale_runs.PID_TAG]) for job in jobs]
        process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        process.communicate(timeout=30)  # EOF: nothing holds its stderr any longer
        assert all(process_gone(pid, 30 - (time.monotonic() - killed)) for pid in workers)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the workers, if they are left
            os.killpg(process.pid, signal.SIGKILL)
    # Each worker ended its own job's run.
    assert {r.info.status for r in sweep_runs(client, "job")} == {"KILLED"}
