"""Sweeps past one machine, tracked on a shared server, the same 4-job sweep on each engine.

Slurm (marked ``slurm``): a throwaway single-node cluster (tests/slurm_cluster.py: munged,
slurmctld, slurmd from Debian's packages, in a temporary folder) and a shared tracking server
on a throwaway PostgreSQL (scripts/local_tracking_server.py). Every sweep goes through the
project's own ``hydra/launcher=slurm`` preset: submitit writes the batch script and submits it
with sbatch, Slurm runs the jobs, the jobs track to the server, and the sweep report is built
from the server alone.

Then what Slurm does to jobs: ``scancel`` of a running job, and a job over its time limit.
Both get SIGTERM (SIGKILL after KillWait); the job ends its MLflow run KILLED, says so in one
line in its log and returns, so that the sweep's process, which waits for every job, sees the
others finish; the sweep exits 1 naming the two, and the report lists them as not included.

Marked ``slurm`` (deselected by default): `make test-slurm` (as root, with the packages; .ci/run
installs them). About four minutes on 2 cores, most of it the time-limit job's minute and Slurm's
30-second time-limit checks.

Ray (marked ``ray``; `make test-ray`, in its own virtualenv): the same sweep as Ray tasks on a
Ray instance started for it, into the same kind of server.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import slurm_cluster
from birnn import numerics
from pipeline.sweeps import job as sweep
from pipeline_testkit import CHECKPOINT_METRICS, OTHER_CPU, ROOT, clean_env, stage

# Jobs run pinned whatever their environment says (OTHER_CPU), where this CPU can run the pin.
PINNED = "unpinned" if numerics.unpinnable_reason() else "pinned"

spec = importlib.util.spec_from_file_location(
    "local_tracking_server", ROOT / "scripts" / "local_tracking_server.py")
server_script = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(server_script)

EXPERIMENT = "slurm-test"
# The quick preset with tiny limits: seconds per job. train.epochs is set per sweep.
SMALL = ("experiment=quick", "train.train_limit=1000", "train.val_limit=200",
         "train.batch_size=100")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = slurm_cluster.missing()
    if reason:
        pytest.fail(f"no throwaway Slurm: {reason}")
    with slurm_cluster.slurm_cluster(tmp_path_factory.mktemp("slurm") / "cluster") as running:
        yield running


@pytest.fixture(scope="module")
def server():
    if server_script.find_pg_bin() is None:
        pytest.fail("PostgreSQL server binaries not installed: apt-get install postgresql")
    with server_script.tracking_server() as running:  # stops both servers on any exit
        yield running


def sweep_command(prepared_dir: Path, sweep_dir: Path, *overrides: str,
                  launcher: str = "slurm") -> list[str]:
    return [sys.executable, "-m", "pipeline.stages.train", "-m", f"hydra/launcher={launcher}",
            "tracking=server", f"tracking.experiment_name={EXPERIMENT}", *SMALL, *overrides,
            f"paths.prepared_dir={prepared_dir}", f"hydra.sweep.dir={sweep_dir}"]


def sweep_env(cluster, server) -> dict[str, str]:
    # tracking=server reads MLFLOW_TRACKING_URI; sbatch passes the environment to the jobs.
    return clean_env(MLFLOW_TRACKING_URI=server.uri, **cluster.env)


def job_runs(server, sweep_id: str) -> dict[int, object]:
    client = MlflowClient(tracking_uri=server.uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return {}
    return {int(run.data.tags[sweep.JOB_TAG]): run
            for run in client.search_runs([experiment.experiment_id], sweep.jobs_filter(sweep_id))}


def array_tasks(sweep_dir: Path) -> dict[int, str]:
    """{task number: Slurm id <array job>_<task>} from submitit's folders."""
    return {int(d.name.split("_")[1]): d.name for d in (sweep_dir / ".submitit").iterdir()
            if d.is_dir() and "_" in d.name}


def job_log(sweep_dir: Path, slurm_id: str) -> str:
    """The job's stderr (submitit's <id>_0_log.err): srun's, Slurm's and the job's lines."""
    return "".join(p.read_text(errors="replace")
                   for p in sorted((sweep_dir / ".submitit" / slurm_id).glob("*_log.err")))


def report(server, tmp_path: Path, sweep_id: str):
    return stage("commands.sweep_report", "tracking=server",
                 f"tracking.experiment_name={EXPERIMENT}",
                 f"paths.reports_dir={tmp_path / 'reports'}", f"sweep={sweep_id}",
                 timeout=180, MLFLOW_TRACKING_URI=server.uri)


@pytest.mark.slurm
def test_a_sweep_runs_as_slurm_jobs_tracked_on_the_shared_server(cluster, server, prepared_dir,
                                                                 tmp_path):
    sweep_dir = tmp_path / "slurm-seeds"
    sweep_id = sweep.sweep_id(str(sweep_dir))
    started = time.monotonic()
    result = subprocess.run(
        sweep_command(prepared_dir, sweep_dir, "model=uni,bi",
                      "train.seed=0,1", "train.epochs=1"),
        env={**sweep_env(cluster, server), **OTHER_CPU}, capture_output=True, text=True,
        timeout=400)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:] + cluster.log_tail()
    assert f"sweep {sweep_id}: 4 jobs finished" in result.stdout, result.stdout[-2000:]

    # One array of four tasks, run and completed by Slurm.
    tasks = array_tasks(sweep_dir)
    assert sorted(tasks) == [0, 1, 2, 3], tasks
    assert len({slurm_id.split("_")[0] for slurm_id in tasks.values()}) == 1
    for slurm_id in tasks.values():
        state = cluster.job_state(slurm_id)
        assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", state
        assert state["Partition"] == "main" and state["TimeLimit"] == "00:30:00", state
    assert cluster.jobs() == []

    runs = job_runs(server, sweep_id)
    assert sorted((r.data.params["model.kind"], r.data.params["train.seed"])
                  for r in runs.values()) == [("bi", "0"), ("bi", "1"), ("uni", "0"), ("uni", "1")]
    client = MlflowClient(tracking_uri=server.uri)
    for run in runs.values():
        assert run.info.status == "FINISHED"
        assert run.data.tags["numerics"] == PINNED  # under another CPU's environment
        assert [m.step for m in client.get_metric_history(run.info.run_id,
                                                          CHECKPOINT_METRICS[0])] == [4, 9]

    built = report(server, tmp_path, sweep_id)
    assert built.returncode == 0, built.stderr[-3000:]
    text = (tmp_path / "reports" / "sweeps" / sweep_id / "report.md").read_text()
    assert "- Jobs: 4 (4 finished)." in text and "Not included" not in text
    print(f"\nslurm sweep of 4 jobs: {elapsed:.0f} s")


def wait_until(condition, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(interval)


@pytest.mark.slurm
def test_scancel_and_the_time_limit_end_those_runs_killed_while_the_others_finish(
        cluster, server, prepared_dir, tmp_path):
    """Jobs 1 and 3 train for thousands of epochs, jobs 0 and 2 for one (Hydra's order:
    uni-1, uni-20000, bi-1, bi-20000). Job 1 is cancelled once its run has a checkpoint; job 3
    runs into the sweep's one-minute limit. Slurm's time-limit warning (submitit's sbatch
    --signal=USR2@<signal_delay_s>) comes at 50 s, after the job has set its handlers."""
    sweep_dir = tmp_path / "slurm-stopped"
    sweep_id = sweep.sweep_id(str(sweep_dir))
    out, err = tmp_path / "sweep.out", tmp_path / "sweep.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen(
            sweep_command(prepared_dir, sweep_dir, "model=uni,bi",
                          "train.epochs=1,20000", "hydra.launcher.timeout_min=1",
                          "hydra.launcher.signal_delay_s=10"),
            env=sweep_env(cluster, server), stdout=stdout, stderr=stderr)
    try:
        running = wait_until(lambda: (run := job_runs(server, sweep_id).get(1)) is not None
                             and CHECKPOINT_METRICS[0] in run.data.metrics and run,
                             120, "job 1's run with a checkpoint")
        assert running.info.status == "RUNNING"
        tasks = array_tasks(sweep_dir)
        cancelled_at = time.monotonic()
        cluster.run("scancel", tasks[1])
        wait_until(lambda: job_runs(server, sweep_id)[1].info.status != "RUNNING", 60,
                   "job 1's run ended")
        cancel_seconds = time.monotonic() - cancelled_at
        process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr_text = err.read_text()
    assert process.returncode == 1, stderr_text[-3000:] + cluster.log_tail()

    runs = job_runs(server, sweep_id)
    assert {num: run.info.status for num, run in runs.items()} == \
        {0: "FINISHED", 1: "KILLED", 2: "FINISHED", 3: "KILLED"}
    for num in (1, 3):
        assert runs[num].data.tags["error"] == "terminated (SIGTERM)"
        assert CHECKPOINT_METRICS[0] in runs[num].data.metrics  # it had trained a while

    # Slurm's side: what it recorded and what it printed into the jobs' logs.
    tasks = array_tasks(sweep_dir)

    def settled():  # slurmctld may still be finishing a job (COMPLETING) when the sweep ends
        found = {num: cluster.job_state(tasks[num]) for num in range(4)}
        return found if all(s["JobState"] != "COMPLETING" for s in found.values()) else None

    states = wait_until(settled, 60, "Slurm's final job states")
    assert [states[num]["JobState"] for num in range(4)] == \
        ["COMPLETED", "CANCELLED", "COMPLETED", "TIMEOUT"], states
    logs = {num: job_log(sweep_dir, tasks[num]) for num in (1, 3)}
    for num, log in logs.items():
        errors = [line for line in log.splitlines() if line.startswith("error:")]
        assert errors == [f"error: job {num}: terminated (SIGTERM), sent by Slurm (scancel or "
                          "the time limit): its run, if it had started, ended KILLED"], log
        assert "Traceback" not in log, log
    assert "CANCELLED AT" in logs[1] and "DUE TO TIME LIMIT" not in logs[1], logs[1]
    assert "DUE TO TIME LIMIT" in logs[3], logs[3]
    assert "warning: SIGUSR2 from Slurm: the time limit is near" in logs[3], logs[3]

    # The sweep's own end: one line naming the two jobs.
    last = stderr_text.strip().splitlines()[-1]
    assert last.startswith(f"error: sweep {sweep_id}: 2 of 4 jobs failed: "), stderr_text[-3000:]
    assert "job 1 (" in last and "job 3 (" in last and last.count("KILLED: terminated") == 2

    built = report(server, tmp_path, sweep_id)
    assert built.returncode == 0, built.stderr[-3000:]
    text = (tmp_path / "reports" / "sweeps" / sweep_id / "report.md").read_text()
    assert "- Jobs: 4 (2 finished, 2 killed)." in text, text[:2000]
    not_included = text.split("Not included (did not finish):", 1)[1].strip().splitlines()
    assert [line.split(" (")[0] for line in not_included[:2]] == ["- job 1", "- job 3"], text
    assert all("KILLED: terminated (SIGTERM)" in line for line in not_included[:2]), text
    print(f"\nscancel -> run KILLED in {cancel_seconds:.1f} s")
    for num, log in logs.items():
        print(f"job {num} ({states[num]['JobState']}) log:\n" + "\n".join(
            line for line in log.splitlines()
            if line.startswith(("slurmstepd", "srun", "error:", "warning:"))))


# ----------------------------------------------------------------------------- Ray
@pytest.mark.ray
def test_ray_runs_the_same_sweep_into_the_shared_server(server, prepared_dir, tmp_path):
    sweep_dir = tmp_path / "ray-seeds"
    sweep_id = sweep.sweep_id(str(sweep_dir))
    started = time.monotonic()
    result = subprocess.run(
        sweep_command(prepared_dir, sweep_dir, "model=uni,bi", "train.seed=0,1",
                      "train.epochs=1", "hydra.launcher.ray.init.num_cpus=2", launcher="ray_local"),
        env=clean_env(MLFLOW_TRACKING_URI=server.uri, RAY_AUTH_MODE="disabled", **OTHER_CPU),
        capture_output=True, text=True, timeout=400)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Ray Launcher is launching 4 jobs" in result.stdout + result.stderr
    assert f"sweep {sweep_id}: 4 jobs finished" in result.stdout, result.stdout[-2000:]
    runs = job_runs(server, sweep_id)
    assert sorted((r.data.params["model.kind"], r.data.params["train.seed"])
                  for r in runs.values()) == [("bi", "0"), ("bi", "1"), ("uni", "0"), ("uni", "1")]
    assert all(run.info.status == "FINISHED" for run in runs.values())
    assert {run.data.tags["numerics"] for run in runs.values()} == {PINNED}
    built = report(server, tmp_path, sweep_id)
    assert built.returncode == 0, built.stderr[-3000:]
    text = (tmp_path / "reports" / "sweeps" / sweep_id / "report.md").read_text()
    assert "- Jobs: 4 (4 finished)." in text and "Not included" not in text
    print(f"\nray sweep of 4 jobs: {elapsed:.0f} s")


def _processes_with(marker: bytes) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if marker in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


@pytest.mark.ray
def test_stopping_a_ray_sweep_ends_its_runs_killed_and_its_workers(server, prepared_dir,
                                                                    tmp_path):
    """Hydra's Ray launcher has no per-job time limit or cancel: what a user can do is stop the
    sweep's process. Two long jobs run; Ctrl-C (SIGINT) once both have a checkpoint. (SIGTERM
    is not a way: Ray's driver installs its own handler, which aborts the process, SIGABRT,
    before the project's hooks can end the runs.)"""
    sweep_dir = tmp_path / "ray-stopped"
    sweep_id = sweep.sweep_id(str(sweep_dir))
    marker = f"BIRNN_TEST_RAY_SWEEP={sweep_dir}"  # finds the sweep's processes, Ray's workers
    err = tmp_path / "sweep.err"
    with open(err, "w") as stderr:
        process = subprocess.Popen(
            sweep_command(prepared_dir, sweep_dir, "model=uni,bi", "train.epochs=2000",
                          "hydra.launcher.ray.init.num_cpus=2", launcher="ray_local"),
            env=clean_env(MLFLOW_TRACKING_URI=server.uri, RAY_AUTH_MODE="disabled",
                          BIRNN_TEST_RAY_SWEEP=str(sweep_dir)),
            stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_until(lambda: len([run for run in job_runs(server, sweep_id).values()
                                if CHECKPOINT_METRICS[0] in run.data.metrics]) == 2,
                   180, "both jobs' runs with a checkpoint")
        stopped_at = time.monotonic()
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
        stop_seconds = time.monotonic() - stopped_at
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = err.read_text()
    assert process.returncode == 128 + signal.SIGINT, text[-3000:]
    assert text.strip().splitlines()[-1] == "error: interrupted", text[-3000:]
    runs = job_runs(server, sweep_id)
    assert {num: run.info.status for num, run in runs.items()} == {0: "KILLED", 1: "KILLED"}
    # "interrupted", from the sweep's hook or the job's own KeyboardInterrupt, or what Ray
    # raised in the worker when the driver went away: which one ends a run first varies.
    reasons = sorted(run.data.tags.get("error", "") for run in runs.values())
    assert all(reasons), reasons
    wait_until(lambda: not _processes_with(marker.encode()), 60, "Ray's processes gone",
               interval=0.5)
    print(f"\nray sweep stopped (SIGINT) -> exit 130, runs KILLED ({reasons}) in "
          f"{stop_seconds:.1f} s")
