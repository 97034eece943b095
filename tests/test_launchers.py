"""Sweeps past one process: Hydra's submitit launcher (local executor; the SLURM preset's batch
script), Ray where its plugin is installed, the one-line error when a plugin is missing, and
DVC's experiment queue (queued experiments run in temporary copies of the repository).

Each sweep is two tiny training jobs (uni, bi) into a SQLite store of its own under tmp_path,
checked through MlflowClient. The store is created before the sweep: the first use of a fresh
SQLite file migrates its schema, and parallel first uses race (tests/test_sweep*.py cover
that); here the subject is the launcher.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline_testkit import (CHECKPOINT_METRICS, TINY, VENV_BIN, clean_env, commit_all, copy_project,
                              dvc, error_lines, run, stage)



def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# hydra-submitit-launcher is part of the project's environment (the `cluster` extra): its
# tests fail, not skip, without it. hydra-ray-launcher is not (see test_ray_... below).
HAS_RAY = installed("hydra_plugins.hydra_ray_launcher")


@pytest.fixture
def store(tmp_path) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()  # creates and migrates the file
    return uri


def sweep(launcher: str, prepared_dir: Path, store: str, tmp_path: Path, *extra: str,
          timeout: float = 240, **env: str):
    # No paths.models_dir/metrics_dir: a sweep job writes only under its own folder.
    return stage("train", "-m", f"hydra/launcher={launcher}", "model=uni,bi", *TINY,
                 f"paths.prepared_dir={prepared_dir}", f"tracking.uri={store}",
                 f"hydra.sweep.dir={tmp_path / 'multirun'}", *extra, timeout=timeout, **env)


def assert_both_runs_tracked(store: str) -> list:
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("birnn-table-19-12")
    assert experiment is not None, "no run reached the store"
    # Training runs only: a sweep may also create a parent run, without metrics.
    runs = [r for r in client.search_runs([experiment.experiment_id])
            if "val_loss" in r.data.metrics]
    assert sorted(r.data.params["model.kind"] for r in runs) == ["bi", "uni"]
    for tracked in runs:
        assert tracked.info.status == "FINISHED"
        for key in CHECKPOINT_METRICS:
            assert [m.step for m in client.get_metric_history(tracked.info.run_id, key)] == [4, 9]
        assert 0.0 < tracked.data.metrics["best_val_acc"] <= 1.0
    return runs


# ----------------------------------------------------------------------------- submitit
def test_submitit_local_runs_each_job_in_its_own_submitit_process(prepared_dir, store,
                                                                   tmp_path):
    result = sweep("local_jobs", prepared_dir, store, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_both_runs_tracked(store)
    # Each job ran through submitit's job runner (python -m submitit.core._submit), the entry
    # a SLURM job uses: one folder per job, with its pickled result and its own log.
    jobs = [d for d in (tmp_path / "multirun" / ".submitit").iterdir()
            if list(d.glob("*_result.pkl"))]
    assert len(jobs) == 2, list((tmp_path / "multirun" / ".submitit").rglob("*"))
    logs = sorted("".join(p.read_text() for p in job.glob("*_log.*")) for job in jobs)
    assert all("trained 1 epochs" in log for log in logs), logs
    assert sum("uni: " in log for log in logs) == 1 and sum("bi: " in log for log in logs) == 1
    assert len({job.name for job in jobs}) == 2  # two processes, two ids


FAKE_SBATCH = """\
    #!{python}
    # sbatch stand-in for tests: keep the batch script, refuse the submission.
    import os, shutil, sys
    shutil.copy(sys.argv[-1], os.environ["FAKE_SLURM_DIR"] + "/submitted.sh")
    sys.exit("sbatch: error: fake sbatch (tests): script kept, nothing submitted")
"""


def test_slurm_preset_submits_one_array_with_the_presets_resources(tmp_path, store):
    """No SLURM here: a stand-in sbatch records the batch script submitit writes from
    conf/hydra/launcher/slurm.yaml (plus overrides) and refuses it. The jobs themselves would
    run python -m submitit.core._submit, as tested above with the local executor."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(textwrap.dedent(FAKE_SBATCH.format(python=sys.executable)))
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit only checks it exists
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    result = stage("train", "-m", "hydra/launcher=slurm", "hydra.launcher.partition=cpu-short",
                   "hydra.launcher.timeout_min=20", "model=uni,bi", *TINY,
                   f"tracking.uri={store}", f"hydra.sweep.dir={tmp_path / 'multirun'}",
                   timeout=120, FAKE_SLURM_DIR=str(tmp_path),
                   PATH=f"{bin_dir}{os.pathsep}{VENV_BIN}{os.pathsep}{os.environ['PATH']}")
    assert result.returncode != 0 and "fake sbatch (tests)" in result.stderr
    script = (tmp_path / "submitted.sh").read_text()
    directives = {line.split("=", 1)[0].removeprefix("#SBATCH "): line.split("=", 1)[1]
                  for line in script.splitlines() if line.startswith("#SBATCH --")}
    assert directives["--array"] == "0-1%2"  # both jobs in one array, run at once
    assert directives["--partition"] == "cpu-short"  # the override
    assert directives["--time"] == "20"
    assert directives["--cpus-per-task"] == "1" and directives["--mem"] == "2GB"  # the preset
    assert directives["--job-name"] == "birnn-train"
    sweep_dir = tmp_path / "multirun"
    assert directives["--output"].startswith(f"{sweep_dir}/.submitit/")
    assert f"{sys.executable} -u -m submitit.core._submit {sweep_dir}/.submitit/%j" in script


# ----------------------------------------------------------------------------- ray
# hydra-ray-launcher pins cloudpickle<3, which joblib 1.6 cannot use, so it lives in its own
# virtualenv: `make test-ray` builds .venv-ray and runs the tests marked `ray` there.
@pytest.mark.ray
def test_ray_runs_the_sweep_as_ray_tasks(prepared_dir, store, tmp_path):
    result = sweep("ray_local", prepared_dir, store, tmp_path, "hydra.launcher.ray.init.num_cpus=2",
                   RAY_AUTH_MODE="disabled")
    assert HAS_RAY, "hydra-ray-launcher is not installed: run this test through `make test-ray`"
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Ray Launcher is launching 2 jobs" in result.stdout + result.stderr
    assert_both_runs_tracked(store)


def test_a_missing_launcher_plugin_is_a_one_line_error(tmp_path):
    result = stage("train", "-m", "hydra/launcher=ray_local", "model=uni,bi", *TINY,
                   f"hydra.sweep.dir={tmp_path / 'multirun'}", timeout=60)
    assert result.returncode == 1
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert "hydra/launcher/ray_local" in lines[0] and "hydra/launcher/ray'" in lines[0]
    assert "comes from the hydra-ray-launcher package, not installed here" in lines[0]
    assert not (tmp_path / "multirun").exists()


# ----------------------------------------------------------------------------- DVC queue
def wait_for_queue(project: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = dvc(project, "queue", "status")
        if not any(word in status for word in ("Queued", "Running")):
            return status
        assert time.monotonic() < deadline, f"queue still busy after {timeout} s:\n{status}"
        time.sleep(2)


def exp_show(project: Path) -> dict[int, dict]:
    """{seed: experiment data} of the queued experiments, from dvc exp show --json."""
    shown = json.loads(dvc(project, "exp", "show", "--json"))
    return {rev["data"]["params"]["conf/train/default.yaml"]["data"]["seed"]: rev["data"]
            for baseline in shown for exp in baseline.get("experiments") or ()
            for rev in exp["revs"]}


@pytest.mark.slow
def test_dvc_queue_runs_copies_that_track_into_the_projects_store(tmp_path_factory):
    """dvc exp run --queue with a seed range, two queue workers: each experiment runs the
    pipeline in its own copy under .dvc/tmp/exps/, yet every run lands in the project's
    mlflow.db (DVC_ROOT points the copies at the project), and dvc exp show has the same
    numbers as MLflow."""
    project = copy_project(tmp_path_factory.mktemp("dvc_queue"))
    (project / "params.yaml").write_text("experiment: quick\ndatasets: [mnist]\n")
    commit_all(project, "preset quick")
    # The store exists before the workers start, as after any earlier dvc repro (two first
    # uses of a fresh SQLite file race on its schema migration; tests/test_sweep*.py's topic).
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    client.search_experiments()
    queued = dvc(project, "exp", "run", "--queue",
                 "-S", "conf/train/default.yaml:seed=range(1,3)",  # seeds 1 and 2
                 "-S", "conf/train/default.yaml:train_limit=2000")  # seconds, not a minute
    assert queued.count("Queued experiment") == 2, queued
    # The workers outlive `dvc queue start` and inherit its stdout: a file, not a pipe.
    with open(project / "queue-start.log", "w") as log:
        subprocess.run(["dvc", "queue", "start", "-j", "2"], cwd=project, env=clean_env(),
                       stdout=log, stderr=subprocess.STDOUT, timeout=60, check=True)
    try:
        status = wait_for_queue(project, timeout=400)
    finally:
        run(["dvc", "queue", "stop", "--kill"], cwd=project, timeout=60)
    assert status.count("Success") == 2, status

    experiments = exp_show(project)
    assert sorted(experiments) == [1, 2]
    experiment = client.get_experiment_by_name("birnn-table-19-12")
    runs = client.search_runs([experiment.experiment_id], "tags.stage = 'train'")
    assert sorted((r.data.tags["seed"], r.data.tags["model_kind"]) for r in runs) == \
        [("1", "bi"), ("1", "uni"), ("2", "bi"), ("2", "uni")]
    for run_ in runs:
        assert run_.info.status == "FINISHED"
        assert run_.data.params["train.train_limit"] == "2000"
        test_json = experiments[int(run_.data.tags["seed"])]["metrics"]["metrics/mnist/test.json"]["data"]
        assert test_json[run_.data.tags["model_kind"]]["best"]["accuracy"] == \
            run_.data.metrics["test_acc_best"]
    # make exp-show: the preset's 3 epochs (not conf/train/default.yaml's 100), each seed, and
    # the test accuracies of dvc exp show, in 120 columns
    shown = run([sys.executable, "-m", "pipeline.commands.exp_show"], cwd=project, timeout=120)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert max(map(len, lines)) <= 120, shown.stdout
    experiment_rows = [line.split() for line in lines if line.startswith("└ ")]
    assert len(experiment_rows) == 2, shown.stdout
    for cells in experiment_rows:  # └ name state preset epochs seed uni-mnist bi-mnist
        _, _, state, preset, epochs, seed, uni, bi = cells
        assert (state, preset, epochs) == ("success", "quick", "3")
        test_json = experiments[int(seed)]["metrics"]["metrics/mnist/test.json"]["data"]
        assert (uni, bi) == (f"{test_json['uni']['best']['accuracy']:.2%}",
                             f"{test_json['bi']['best']['accuracy']:.2%}")
    # One store: the copies (deleted by now) wrote nothing of their own into the project.
    assert sorted(p.name for p in project.rglob("mlflow.db")) == ["mlflow.db"]
