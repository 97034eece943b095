"""Nothing outside the project's outputs is ever written, replaced or deleted.

Hostile path values go through the real entry points in a copy of the project (its own code,
with $BIRNN_OUTPUT_ROOTS empty so that only its output folders are allowed): each must end in
one line naming the key, before any work, with every file of the copy unchanged. Then the
rules themselves: a folder the pipeline did not write is never replaced, what a killed run left
is removed by the next one, and the tests leave nothing in the checkout.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import files, paths
from pipeline.guard import locks, output_paths
from pipeline.guard.errors import ConfigError
from pipeline_testkit import ROOT, TINY, clean_env, copy_project, error_lines, stage


def snapshot(project: Path) -> dict[str, str]:
    """Every file of the project (but Hydra's outputs/ and git's own) and its sha256."""
    found = {}
    for path in project.rglob("*"):
        relative = path.relative_to(project)
        if relative.parts[0] in ("outputs", ".git") or path.is_dir():
            continue
        found[str(relative)] = ("link " + os.readlink(path) if path.is_symlink()
                                else hashlib.sha256(path.read_bytes()).hexdigest())
    return found


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the project with outputs in place, as after `dvc repro`: data/prepared/mnist/,
    models/mnist/uni/, evaluation/mnist/, and a symlink inside models/ that points at the raw
    data."""
    copy = copy_project(tmp_path_factory.mktemp("hostile") / "project")
    (copy / "data" / "prepared" / "mnist").mkdir(parents=True)
    (copy / "data" / "prepared" / "mnist" / "meta.json").write_text("{}")
    (copy / "models" / "mnist" / "uni").mkdir(parents=True)
    (copy / "models" / "mnist" / "uni" / "best.npz").write_bytes(b"weights")
    (copy / "evaluation" / "mnist" / "uni").mkdir(parents=True)
    (copy / "evaluation" / "mnist" / "uni" / "details.json").write_text("{}")
    (copy / "models" / "link").symlink_to(copy / "data")
    return copy


OUTSIDE = "<outside>"  # an absolute folder outside the copy, filled in by the test

HOSTILE = [  # stage, overrides, the start of the one error line
    ("prepare", ["paths.prepared_dir="], "paths.prepared_dir: must not be empty"),
    ("prepare", ["paths.prepared_dir=.."], "paths.prepared_dir: '..' resolves to"),
    ("prepare", ["paths.prepared_dir=data"], "paths.prepared_dir: 'data' resolves to"),
    ("prepare", ["paths.prepared_dir=data/raw/mnist"], "paths.prepared_dir: 'data/raw/mnist'"),
    ("prepare", [f"paths.prepared_dir={OUTSIDE}"], "paths.prepared_dir: '/"),
    ("prepare", ["paths.prepared_dir=models/link"], "paths.prepared_dir: 'models/link' resolves"),
    ("prepare", ["paths.prepared_dir=models"], "paths.prepared_dir: {project}/models is a "
                                               "non-empty folder this pipeline did not write"),
    ("prepare", ["paths.prepared_dir=reports/table_19_12/mnist/report.md"],
     "paths.prepared_dir: {project}/reports/table_19_12/mnist/report.md is a file"),
    ("prepare", ["paths.prepared_dir=models/mnist"], "paths.prepared_dir: {project}/models/mnist "
                                                     "is a non-empty folder"),
    ("prepare", ["hydra.run.dir=data/raw/mnist"], "hydra.run.dir: 'data/raw/mnist' resolves"),
    ("train", ["paths.models_dir=data", "name=raw"], "paths.models_dir: 'data/raw' resolves"),
    ("train", ["name=.."], "name: must be a plain folder name"),
    ("train", ["name=" + "a" * 240], "name: must be a plain folder name"),  # ENAMETOOLONG
    ("train", ["name=a%00b"], "name: must be a plain folder name"),  # MLflow refuses it
    ("train", ["-m", "hydra.sweep.dir=data/sweep", "model=uni"], "hydra.sweep.dir: 'data/sweep'"),
    ("evaluate", ["paths.evaluation_dir=reports"], "paths.evaluation_dir: {project}/reports is "
                                                   "a non-empty folder"),
    # another stage's output, each at its own default place
    ("prepare", ["paths.prepared_dir=reports/table_19_12/mnist"], "paths.prepared_dir: "
     "{project}/reports/table_19_12/mnist holds another stage's output (report)"),
    ("train", ["paths.models_dir=data/prepared", "name=mnist"], "paths.models_dir: "
     "{project}/data/prepared/mnist holds another stage's output (prepared data)"),
    ("evaluate", ["paths.evaluation_dir=models/mnist/uni"], "paths.evaluation_dir: "
     "{project}/models/mnist/uni holds another stage's output (model)"),
    ("compare", ["paths.reports_dir=data"], "paths.reports_dir: 'data/table_19_12/mnist' resolves"),
    # another dataset's or another model's output
    ("evaluate", ["paths.evaluation_dir=evaluation/fashion_mnist"], "paths.evaluation_dir: "
     "{project}/evaluation/fashion_mnist holds dataset fashion_mnist's output, and this run is "
     "dataset=mnist: refusing to write it"),
    ("train", ["paths.metrics_dir=metrics/fashion_mnist"], "paths.metrics_dir: "
     "{project}/metrics/fashion_mnist holds dataset fashion_mnist's output"),
    ("train", ["model=uni", "name=bi"], "name: is the bi model's folder and registered name, "
     "and model=uni trains uni"),
    ("commands.sweep_report", ["sweep=../../data"], "sweep: must be a plain folder name"),
    # Hydra's own keys: its log file, its files' subfolder, its run folder
    ("prepare", ["hydra.job_logging.handlers.file.filename=data/raw/mnist/SHA256SUMS"],
     "hydra.job_logging.handlers.file.filename: Hydra's log goes into the run's folder"),
    ("prepare", ["hydra.job_logging.handlers.file.filename=data/raw/mnist/SHA256SUMS",
                 "hydra.job_logging.handlers.file.mode=w"],
     "hydra.job_logging.handlers.file.filename: Hydra's log goes into the run's folder"),
    ("train", ["hydra.output_subdir=../../../models/mnist/bi"], "hydra.output_subdir: "
     "'../../../models/mnist/bi' must be a folder name inside the run's folder"),
    ("train", ["hydra.run.dir=models/mnist/bi"], "hydra.run.dir: {project}/models/mnist/bi lies "
     "in another stage's output (model)"),
    ("train", ["paths.metrics_dir=models/mnist/bi"], "paths.metrics_dir: {project}/models/mnist/bi"
     " lies in another stage's output (model)"),
    ("evaluate", ["paths.metrics_dir=evaluation/mnist"], "paths.metrics_dir: "
     "{project}/evaluation/mnist lies in another stage's output (evaluation)"),
    ("prepare", ["hydra.run.dir=${paths.prepared_dir}/../../raw/mnist"], "hydra.run.dir: "
     "'${{paths.prepared_dir}}/../../raw/mnist': only ${{now:...}} may be interpolated here"),
]


@pytest.mark.parametrize("module, overrides, start", HOSTILE,
                         ids=[" ".join(case[1]) for case in HOSTILE])
def test_a_hostile_output_path_is_one_line_and_touches_nothing(project, tmp_path, module,
                                                               overrides, start):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    overrides = [o.replace(OUTSIDE, str(outside)) for o in overrides]
    before = snapshot(project)

    result = stage(module, *overrides, cwd=project, timeout=120,
                   **{output_paths.ROOTS_ENV: ""})

    assert result.returncode == 1, result.stderr[-2000:]
    assert len(error_lines(result)) == 1, result.stderr
    (line,) = error_lines(result)
    assert line.startswith("error: config error: " + start.format(project=project)), line
    assert snapshot(project) == before
    assert [p.name for p in outside.iterdir()] == ["keep.txt"]
    assert not (project / "data" / "raw" / "mnist" / ".hydra").exists()


# ----------------------------------------------------------------------------- the rules
def test_a_non_empty_folder_the_pipeline_did_not_write_is_never_replaced(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("years of work")
    with pytest.raises(ConfigError, match="non-empty folder this pipeline did not write"):
        with files.publish_dir(theirs, "model") as staging:
            (staging / "a.txt").write_text("output")
    assert [p.name for p in theirs.iterdir()] == ["thesis.tex"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["theirs"]  # no staging left

    ours = tmp_path / "ours"
    for text in ("first", "second"):  # new, then replaced: it carries the marker
        with files.publish_dir(ours, "model") as staging:
            (staging / "a.txt").write_text(text)
        assert (ours / output_paths.MARKER).is_file() and (ours / "a.txt").read_text() == text

    empty = tmp_path / "empty"
    empty.mkdir()
    with files.publish_dir(empty, "model") as staging:
        (staging / "a.txt").write_text("output")
    assert (empty / "a.txt").is_file()


def test_an_output_of_one_kind_is_never_replaced_by_another_kind(tmp_path):
    ours = tmp_path / "ours"
    with files.publish_dir(ours, "model") as staging:
        (staging / "best.npz").write_text("weights")
    with pytest.raises(ConfigError, match=r"holds another stage's output \(model\), not report"):
        with files.publish_dir(ours, "report"):
            pass
    assert sorted(p.name for p in ours.iterdir()) == [output_paths.MARKER, "best.npz"]
    old = tmp_path / "old"  # marked before markers named their kind: still the pipeline's
    old.mkdir()
    (old / output_paths.MARKER).write_text("Written by the birnn pipeline\n")
    (old / "a.txt").write_text("old")
    with files.publish_dir(old, "report") as staging:
        (staging / "a.txt").write_text("new")
    assert output_paths.marked_kind(old) == "report"


def test_outputs_written_before_folders_were_marked_are_still_replaced(tmp_path, monkeypatch):
    """data/prepared/<dataset> restored by DVC, models/<dataset>/<name>/ and
    reports/sweeps/<id>/ from git: the places the shipped configuration writes to are the
    pipeline's, marker or not."""
    monkeypatch.setattr(paths, "PROJECT_ROOT", tmp_path)
    for folder, kind in (("data/prepared/mnist", "prepared data"), ("models/mnist/uni", "model"),
                         ("evaluation/fashion_mnist", "evaluation"),
                         ("reports/table_19_12/mnist", "report"),
                         ("reports/sweeps/book-seeds", "report"), ("reports/findings", "report")):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "old.txt").write_text("old output")
        with files.publish_dir(tmp_path / folder, kind) as staging:
            (staging / "new.txt").write_text("new output")
        assert sorted(p.name for p in (tmp_path / folder).iterdir()) == [
            output_paths.MARKER, "new.txt"]
    (tmp_path / "models" / "notes").mkdir()
    (tmp_path / "models" / "notes" / "todo.txt").write_text("mine")
    for folder in ("models", "models/mnist", "data/prepared", "reports/table_19_12"):
        with pytest.raises(ConfigError, match="did not write"):  # these hold outputs, are none
            with files.publish_dir(tmp_path / folder, "model"):
                pass
    for folder, kind in (("models/mnist/uni", "prepared data"), ("data/prepared/mnist", "model"),
                         ("reports/findings", "evaluation")):  # another kind's place
        with pytest.raises(ConfigError, match="holds another stage's output"):
            with files.publish_dir(tmp_path / folder, kind):
                pass


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_leftovers_of_killed_writers_are_removed_and_a_live_writers_kept(tmp_path):
    host = files._owner().split(".")[1]
    dead, live = _dead_pid(), os.getpid()
    target = tmp_path / "out"
    target.mkdir()
    (target / output_paths.MARKER).write_text("")
    leftovers = [f".out.new.{dead}.{host}.abcd1234", ".out.new.k2j3h4g5",  # staging folders
                 f".out.old.{dead}.{host}.zz99yy88"]
    for name in leftovers:
        (tmp_path / name).mkdir()
        (tmp_path / name / "half.npz").write_bytes(b"half")
    (tmp_path / f".out.{dead}.{host}.q1w2e3r4.tmp.npz").write_bytes(b"half")  # a file's
    kept = [f".out.new.{live}.{host}.livewr1t", f".out.new.{dead}.0000beef.otherhst",
            ".other.new.k2j3h4g5", "out.new.k2j3h4g5"]  # live, another host's, not ours
    for name in kept:
        (tmp_path / name).mkdir()

    with files.publish_dir(target, "report") as staging:
        (staging / "a.txt").write_text("new")

    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", *kept])


def test_a_second_training_into_a_model_folder_being_written_is_refused(tmp_path, prepared_dir):
    models, metrics = tmp_path / "models", tmp_path / "metrics"
    train = ["train", *TINY, f"paths.prepared_dir={prepared_dir}", f"paths.models_dir={models}",
             f"paths.metrics_dir={metrics}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    with locks.exclusive(models / "uni", "wait"):  # a first writer, in this process
        result = stage(*train, timeout=120)
    assert result.returncode == 1
    assert error_lines(result) == [
        f"error: {models / 'uni'}: another process is writing it (pid {os.getpid()} on "
        f"{socket.gethostname()}): wait for it to end, or train into another name=..."]
    assert not models.exists() and not metrics.exists()

    assert stage(*train, timeout=120).returncode == 0  # the lock went with its holder
    assert sorted(p.name for p in (models / "uni").iterdir()) == [
        output_paths.MARKER, "best.npz", "config.yaml", "last.npz", "run.json"]


def test_a_folder_moved_aside_by_a_killed_run_is_put_back(tmp_path):
    host = files._owner().split(".")[1]
    aside = tmp_path / f".out.old.{_dead_pid()}.{host}.abcd1234"
    (aside / "out").mkdir(parents=True)
    (aside / "out" / "model.npz").write_text("the previous output")
    files.remove_leftovers(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "model.npz").read_text() == "the previous output"


def test_the_next_run_removes_what_a_killed_prepare_left(tmp_path):
    out = tmp_path / "prepared"
    command = [sys.executable, "-m", "pipeline.stages.prepare", f"paths.prepared_dir={out}"]
    process = subprocess.Popen(command, env=clean_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while not list(tmp_path.glob(".prepared.new.*/*.npz")):  # in the middle of writing
            assert process.poll() is None and time.monotonic() < deadline, "never saw staging"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert list(tmp_path.glob(".prepared.new.*")) and not out.exists()

    result = stage("prepare", f"paths.prepared_dir={out}", timeout=120)

    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]
    assert sorted(p.name for p in out.iterdir()) == [
        output_paths.MARKER, "meta.json", "test.npz", "train.npz", "val.npz"]


# ----------------------------------------------------------------------------- clean up
def test_stages_started_by_the_tests_write_hydra_outputs_outside_the_checkout():
    before = set((ROOT / "outputs").glob("*/*"))
    result = stage("prepare", "paths.prepared_dir=", timeout=60)  # fails after Hydra started
    assert result.returncode == 1
    assert set((ROOT / "outputs").glob("*/*")) == before
    assert list(Path.cwd().glob("outputs/*/*/.hydra")) and ROOT not in Path.cwd().parents


def test_make_ui_starts_no_job_runners():
    (ui,) = [line for line in (ROOT / "Makefile").read_text().splitlines()
             if "mlflow ui" in line or "mlflow server" in line]
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in ui and "127.0.0.1" in ui
