"""Reproducible anywhere: the stages compute from their DVC deps, so a project shared through a
DVC remote works in a second clone with an empty MLflow store, and a queued experiment whose
copy lacks an unchanged model's run.json (outside DVC: .dvcignore) succeeds.

Both run the quick preset on MNIST alone in a copy of the project (its own git repository,
DVC cache and mlflow.db), pushed to a local-folder remote.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline_testkit import clean_env, commit_all, copy_project, dvc, run

pytestmark = pytest.mark.slow
MNIST_STAGES = ("prepare@mnist", "train@mnist-uni", "train@mnist-bi", "evaluate@mnist",
                "compare@mnist")


def git(project: Path, *args: str) -> str:
    result = run(["git", *args], cwd=project, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict:
    """A project copy that ran the quick pipeline on MNIST, with a local-folder remote as its
    default (`dvc remote add -d`, committed as a team would) and everything pushed to it."""
    base = tmp_path_factory.mktemp("sharing")
    project = copy_project(base / "project")
    (project / "params.yaml").write_text("experiment: quick\ndatasets: [mnist]\n")
    commit_all(project, "preset quick, MNIST only")
    started = time.monotonic()
    output = dvc(project, "repro", timeout=1800)
    print(f"dvc repro: {time.monotonic() - started:.0f} s")
    assert all(f"Running stage '{name}'" in output for name in MNIST_STAGES), output
    remote = base / "remote"
    dvc(project, "remote", "add", "-d", "team", str(remote))
    commit_all(project, "ran the pipeline; the team's remote")
    dvc(project, "push")
    return {"base": base, "project": project, "remote": remote}


def test_a_second_clone_pulls_the_outputs_and_needs_no_training_store(shared):
    """git clone + dvc pull, no mlflow.db: dvc status is clean, dvc repro runs nothing, and a
    forced evaluate succeeds, recording into a new run that names each model by its weights."""
    clone = shared["base"] / "clone"
    git(shared["base"], "clone", "-q", str(shared["project"]), str(clone))
    dvc(clone, "pull")
    assert not (clone / "mlflow.db").exists()
    assert not list((clone / "models").rglob("run.json"))  # outside DVC: not shared

    status = dvc(clone, "status")
    assert "Data and pipelines are up to date" in status, status
    repro = dvc(clone, "repro", "compare@mnist")
    assert "Running stage" not in repro and "Data and pipelines are up to date" in repro, repro

    forced = run(["dvc", "repro", "-f", "-s", "evaluate@mnist"], cwd=clone, timeout=600)
    assert forced.returncode == 0, forced.stdout[-3000:] + forced.stderr[-3000:]
    said = [line for line in (forced.stdout + forced.stderr).splitlines()
            if "recording its evaluation in a new run" in line]
    assert len(said) == 2, forced.stdout + forced.stderr  # one line per model
    assert all("no run.json beside it" in line for line in said)
    # The same numbers as the training machine's, byte for byte: nothing to commit.
    assert git(clone, "status", "--porcelain") == ""
    client = MlflowClient(f"sqlite:///{clone / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("birnn-table-19-12")
    evaluations = client.search_runs([experiment.experiment_id], "tags.stage = 'evaluate'")
    assert sorted(r.data.tags["model_name"] for r in evaluations) == ["bi", "uni"]
    test = json.loads((clone / "metrics" / "mnist" / "test.json").read_text())
    for evaluation in evaluations:
        tags = evaluation.data.tags
        name = tags["model_name"]
        weights = clone / "models" / "mnist" / name / "best.npz"
        assert tags["weights_sha256_best"] == hashlib.sha256(weights.read_bytes()).hexdigest()
        assert evaluation.info.run_name == f"{name}-mnist-seed0 (weights " \
                                           f"{tags['weights_sha256_best'][:12]})"
        assert evaluation.data.metrics["test_acc_best"] == test[name]["best"]["accuracy"]

    compared = run(["dvc", "repro", "-f", "-s", "compare@mnist"], cwd=clone, timeout=600)
    assert compared.returncode == 0, compared.stdout[-3000:] + compared.stderr[-3000:]
    assert git(clone, "status", "--porcelain") == ""  # the same report, byte for byte
    [report] = client.search_runs([experiment.experiment_id], "tags.stage = 'compare'")
    assert sorted(report.data.tags["compared_run_ids"].split(",")) == \
        sorted(r.info.run_id for r in evaluations)


def wait_for_queue(project: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = dvc(project, "queue", "status")
        if not any(word in status for word in ("Queued", "Running")):
            return status
        assert time.monotonic() < deadline, f"queue still busy after {timeout} s:\n{status}"
        time.sleep(2)


def test_a_queued_experiment_with_one_model_unchanged_succeeds(shared):
    """dvc exp run --queue changing bi only: the queue's copy skips uni's training and has no
    uni/run.json; evaluate records uni into a run of its own, and make exp-show shows the
    experiment as a success with its own numbers."""
    project = shared["project"]
    baseline = json.loads((project / "metrics" / "mnist" / "test.json").read_text())
    queued = dvc(project, "exp", "run", "--queue", "-S", "conf/model/bi.yaml:lr=0.02")
    assert "Queued experiment" in queued, queued
    with open(project / "queue-start.log", "w") as log:  # the worker outlives queue start
        subprocess.run(["dvc", "queue", "start", "-j", "1"], cwd=project, env=clean_env(),
                       stdout=log, stderr=subprocess.STDOUT, timeout=60, check=True)
    try:
        status = wait_for_queue(project, timeout=900)
    finally:
        run(["dvc", "queue", "stop", "--kill"], cwd=project, timeout=60)
    assert "Success" in status and "Failed" not in status, status

    shown = json.loads(dvc(project, "exp", "show", "--json"))
    [experiment] = [exp for baseline_rev in shown for exp in baseline_rev.get("experiments") or ()]
    assert experiment["executor"]["state"] == "success"
    test = experiment["revs"][0]["data"]["metrics"]["metrics/mnist/test.json"]["data"]
    assert test["uni"] == baseline["uni"]          # unchanged, not retrained
    assert test["bi"] != baseline["bi"]            # its own
    table = run([sys.executable, "-m", "pipeline.commands.exp_show"], cwd=project, timeout=120)
    assert table.returncode == 0, table.stderr
    [row] = [line.split() for line in table.stdout.splitlines() if line.startswith("└ ")]
    assert row[2] == "success"
    assert row[-1] == f"{test['bi']['best']['accuracy']:.2%}", table.stdout
