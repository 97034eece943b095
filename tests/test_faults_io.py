"""Every error a user or the machine can cause is one line: read-only and full filesystems, a
read-only, full or deleted tracking store, the OS errors behind them, and input files that are
not what they claim (a text file for a model, prepared data of other raw files).

The filesystem faults are real where the machine allows: each stage runs under
``unshare --mount`` with a read-only bind mount or a tiny tmpfs that exist only for that
command (root in a container, as CI runs). The mapping of OS errors is also tested in-process,
by injecting them.
"""

from __future__ import annotations

import errno
import json
import re
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipeline import files
from pipeline.guard import output_paths
from pipeline.guard.errors import MissingInputError, StageError, is_expected, one_line
from pipeline_testkit import ROOT, TINY, clean_env, copy_project, error_lines, stage


def _can_mount() -> bool:
    try:
        return subprocess.run(["unshare", "--mount", "sh", "-c",
                               "mount -t tmpfs -o size=64k tmpfs /mnt"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


CAN_MOUNT = _can_mount()
needs_mounts = pytest.mark.skipif(not CAN_MOUNT, reason="needs root for unshare --mount")


def under_mounts(setup: list[str], module: str, *overrides: str, cwd: Path | None = None,
                 after: str = "", **env: str) -> subprocess.CompletedProcess:
    """``python -m <module> <overrides>`` after the shell commands ``setup`` (mounts), in a
    private mount namespace; ``after`` runs once the stage has exited, in the same one."""
    stage = shlex.join([sys.executable, "-m", module, *overrides])
    script = " && ".join(setup) + f" && {{ {stage}; code=$?; {after or 'true'}; exit $code; }}"
    return subprocess.run(["unshare", "--mount", "sh", "-c", script], cwd=cwd,
                          env=clean_env(**env), capture_output=True, text=True, timeout=300)


def read_only(path: Path) -> list[str]:
    return [f"mount --bind {shlex.quote(str(path))} {shlex.quote(str(path))}",
            f"mount -o remount,ro,bind {shlex.quote(str(path))}"]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return copy_project(tmp_path_factory.mktemp("faults") / "project")


# ----------------------------------------------------------------------------- real faults
@needs_mounts
def test_a_read_only_data_folder_stops_prepare_before_it_reads_anything(project):
    result = under_mounts(read_only(project / "data"), "pipeline.stages.prepare", cwd=project)
    assert result.returncode == 1
    assert error_lines(result) == [
        f"error: paths.prepared_dir: {project / 'data' / 'prepared' / 'mnist'}: cannot write: read-only "
        f"file system ({project / 'data'})"]
    assert "reading" not in result.stdout + result.stderr


@needs_mounts
def test_a_read_only_reports_folder_stops_compare_in_one_line(project):
    result = under_mounts(read_only(project / "reports"), "pipeline.stages.compare",
                          cwd=project)
    assert result.returncode == 1
    assert error_lines(result) == [
        f"error: paths.reports_dir: {project / 'reports' / 'table_19_12' / 'mnist'}: cannot "
        f"write: read-only file system ({project / 'reports' / 'table_19_12'})"]
    assert not (project / "mlflow.db").exists()  # stopped before it touched the store


@needs_mounts
def test_a_full_disk_is_one_line_naming_the_output_and_leaves_nothing(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    result = under_mounts([f"mount -t tmpfs -o size=2m tmpfs {disk}"],
                          "pipeline.stages.prepare", f"paths.prepared_dir={disk / 'prepared'}",
                          after=f"echo left: $(ls -A {disk})")
    assert result.returncode == 1
    assert error_lines(result) == [
        f"error: {disk / 'prepared' / 'train.npz'}: cannot write: No space left on device"]
    assert result.stdout.splitlines()[-1] == "left:"  # the full disk, afterwards: empty


@needs_mounts
def test_a_full_metrics_disk_publishes_no_model_either(tmp_path, prepared_dir):
    # A model folder and its metrics files are published together or not at all: a new model
    # beside the last training's metrics would be read as one result.
    disk, models = tmp_path / "disk", tmp_path / "models"
    disk.mkdir()
    fill = f"mkdir {disk / 'metrics'} && {{ dd if=/dev/zero of={disk / 'fill'} bs=4k 2>/dev/null; true; }}"
    result = under_mounts([f"mount -t tmpfs -o size=64k tmpfs {disk}", fill],
                          "pipeline.stages.train", *TINY, f"paths.prepared_dir={prepared_dir}",
                          f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                          f"paths.models_dir={models}", f"paths.metrics_dir={disk / 'metrics'}",
                          after=f"echo left: $(ls -A {disk / 'metrics'})")
    assert result.returncode == 1
    [line] = error_lines(result)
    assert re.fullmatch(rf"error: {disk / 'metrics'}/(history|train)_uni\.\w+: cannot write: "
                        "No space left on device", line), line
    assert result.stdout.splitlines()[-1] == "left:"
    assert not models.exists()  # no model folder
    [run] = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(["0", "1"])
    assert run.info.status == "FAILED"


@needs_mounts
def test_a_read_only_tracking_store_is_one_line(tmp_path, prepared_dir):
    db = tmp_path / "mlflow.db"
    client = MlflowClient(f"sqlite:///{db}")
    client.create_experiment("birnn-table-19-12", artifact_location=(tmp_path / "a").as_uri())
    result = under_mounts(read_only(db), "pipeline.stages.train", *TINY,
                          f"tracking.uri=sqlite:///{db}", f"paths.prepared_dir={prepared_dir}",
                          f"paths.models_dir={tmp_path / 'models'}",
                          f"paths.metrics_dir={tmp_path / 'metrics'}")
    assert result.returncode == 1
    assert error_lines(result) == [
        f"error: {db}: the tracking store is read-only (attempt to write a readonly database): "
        "make the file and its folder writable, or set tracking.uri to another store"], \
        result.stderr


@needs_mounts
def test_a_tracking_store_on_a_full_disk_is_one_line(tmp_path, prepared_dir):
    made = tmp_path / "made.db"
    MlflowClient(f"sqlite:///{made}").create_experiment(
        "birnn-table-19-12", artifact_location=(tmp_path / "a").as_uri())
    disk = tmp_path / "disk"
    disk.mkdir()
    db = disk / "mlflow.db"
    result = under_mounts([f"mount -t tmpfs -o size=4m tmpfs {disk}", f"cp {made} {db}",
                           f"{{ dd if=/dev/zero of={disk / 'fill'} bs=4k 2>/dev/null || true; }}"],
                          "pipeline.stages.train", *TINY, f"tracking.uri=sqlite:///{db}",
                          f"paths.prepared_dir={prepared_dir}",
                          f"paths.models_dir={tmp_path / 'models'}",
                          f"paths.metrics_dir={tmp_path / 'metrics'}")
    assert result.returncode == 1
    assert error_lines(result) == [
        f"error: {db}: the tracking store's disk is full (database or disk is full): free "
        "space on that filesystem, or set tracking.uri to a store on another disk"], \
        result.stderr


def test_a_tracking_store_deleted_while_in_use_is_one_line(tmp_path):
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import store

    db = tmp_path / "mlflow.db"
    client = store.StoreClient(MlflowClient(f"sqlite:///{db}"))
    experiment = client.create_experiment("x", artifact_location=(tmp_path / "a").as_uri())
    db.unlink()  # SQLite's open connection now answers "readonly" (SQLITE_READONLY_DBMOVED)
    with pytest.raises(MlflowException) as info:
        client.create_run(experiment)
    assert is_expected(info.value)
    assert one_line(info.value) == (
        f"{db}: the tracking store was deleted or moved while in use (attempt to write a "
        "readonly database): put it back, or rerun the stage to start a new store there")


def _model_folder(tmp_path: Path, prepared_dir: Path) -> Path:
    """models/uni/ with both parameter files and a run.json whose run is in the store
    tmp_path/mlflow.db (no training: the faults below are in the files)."""
    from birnn.models import build_model
    from pipeline import prepared_data

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("x", artifact_location=(tmp_path / "a").as_uri())
    run_id = client.create_run(experiment).info.run_id
    folder = tmp_path / "models" / "uni"
    model = build_model("uni", seed=1, hidden_size=8)
    model.save(folder / "best.npz")
    model.save(folder / "last.npz")
    meta = prepared_data.read_meta(prepared_dir)
    (folder / "run.json").write_text(json.dumps(
        {"run_id": run_id, "dataset": "mnist", "data_sha256": prepared_data.fingerprint(meta)}))
    return folder


def test_a_text_file_in_place_of_a_model_is_one_line(tmp_path, prepared_dir):
    folder = _model_folder(tmp_path, prepared_dir)
    (folder / "best.npz").write_text("not a model\n")
    result = stage("evaluate", "models=[uni]", f"paths.prepared_dir={prepared_dir}",
                   f"paths.models_dir={tmp_path / 'models'}",
                   f"paths.metrics_dir={tmp_path / 'metrics'}",
                   f"paths.evaluation_dir={tmp_path / 'evaluation'}",
                   f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", timeout=120)
    assert result.returncode == 1
    assert error_lines(result) == [
        f"error: {folder / 'best.npz'}: not a saved model (not an .npz archive): retrain it "
        "(python -m pipeline.stages.train dataset=mnist model=uni)"], result.stderr
    assert not (tmp_path / "metrics").exists()


@pytest.mark.parametrize("stage_name", ["train", "evaluate"])
def test_prepared_data_of_other_raw_files_under_a_datasets_name_is_refused(
        stage_name, tmp_path, prepared_dir):
    # Fashion-MNIST's files prepared with data=mnist (another raw_dir and manifest): meta.json
    # says mnist, its raw checksums are Fashion-MNIST's.
    from birnn.data import read_manifest

    copy = tmp_path / "prepared"
    copy.mkdir()
    for split in ("train", "val", "test"):
        (copy / f"{split}.npz").symlink_to(prepared_dir / f"{split}.npz")
    meta = json.loads((prepared_dir / "meta.json").read_text())
    meta["raw_files"] = {"verified_against": "data/raw/fashion_mnist/SHA256SUMS",
                         "sha256": read_manifest(ROOT / "data/raw/fashion_mnist/SHA256SUMS")}
    (copy / "meta.json").write_text(json.dumps(meta))
    result = stage(stage_name, *(TINY if stage_name == "train" else ()),
                   f"paths.prepared_dir={copy}",
                   f"paths.models_dir={tmp_path / 'models'}",
                   f"paths.metrics_dir={tmp_path / 'metrics'}",
                   f"paths.evaluation_dir={tmp_path / 'evaluation'}",
                   f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", timeout=120)
    assert result.returncode == 1
    assert error_lines(result) == [
        f"error: {copy / 'meta.json'}: says 'mnist', but the raw files it records are not the "
        "ones data/raw/mnist/SHA256SUMS lists (t10k-images-idx3-ubyte.gz differs): prepare it "
        "again (python -m pipeline.stages.prepare data=mnist)"], result.stderr
    assert not (tmp_path / "models" / "uni").exists() and not (tmp_path / "metrics").exists()


# ----------------------------------------------------------------------------- injected
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT])
def test_a_machine_fault_while_writing_an_output_names_the_output(tmp_path, monkeypatch, code):
    def savez(path, **arrays):
        Path(path).write_bytes(b"half")
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(np, "savez", savez)
    target = tmp_path / "out" / "train.npz"
    with pytest.raises(StageError) as info:
        files.save_npz(target, {"a": np.zeros(3)})
    assert str(info.value) == f"{target}: cannot write: {os.strerror(code)}"
    assert list((tmp_path / "out").iterdir()) == []  # no temporary file left


def test_a_machine_fault_inside_a_published_folder_leaves_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "out"
    with files.publish_dir(target, "report") as staging:
        (staging / "a.txt").write_text("first")
    with pytest.raises(StageError, match=f"^{target}: cannot write: No space left on device$"):
        with files.publish_dir(target, "report") as staging:
            raise OSError(errno.ENOSPC, "No space left on device", str(staging / "a.txt"))
    assert (target / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_os_errors_from_the_machine_are_one_line_and_the_others_keep_their_traceback():
    full = OSError(errno.ENOSPC, "No space left on device", "/x/y.npz")
    assert is_expected(full) and one_line(full) == "/x/y.npz: No space left on device"
    assert is_expected(PermissionError(errno.EACCES, "Permission denied", "/x"))
    assert not is_expected(FileNotFoundError(errno.ENOENT, "No such file", "/x"))  # a bug
    assert not is_expected(OSError("something else"))


def test_an_sql_error_is_shown_without_its_statement():
    from mlflow.exceptions import MlflowException

    exc = MlflowException("(raised as a result of Query-invoked autoflush; consider using a "
                          "session.no_autoflush block if this flush is occurring prematurely) "
                          "(sqlite3.OperationalError) attempt to write a readonly database\n"
                          "[SQL: INSERT INTO runs VALUES (?)]\n[parameters: ('x',)]\n"
                          "(Background on this error at: https://sqlalche.me/e/21/e3q8)")
    assert is_expected(exc)
    assert one_line(exc) == "(sqlite3.OperationalError) attempt to write a readonly database"


def test_an_output_folder_on_a_read_only_filesystem_is_found_before_the_work(monkeypatch,
                                                                            tmp_path):
    monkeypatch.setattr(output_paths.os, "access", lambda path, mode: False)
    output = output_paths.Output("paths.reports_dir", tmp_path / "reports" / "x", True)
    with pytest.raises(StageError, match=r"^paths.reports_dir: .*/reports/x: cannot write: "):
        output_paths.check_writable(output)



@pytest.mark.parametrize("content, says", [
    ("[]", "damaged: the file holds list [], not an object"),
    ("{}", "damaged: run_id is missing"),
    ('{"run_id": 7}', "damaged: run_id is 7, not a str"),
])
def test_a_damaged_run_json_is_one_line(tmp_path, content, says):
    from pipeline.tracking import runs

    model_dir = tmp_path / "uni"
    model_dir.mkdir()
    (model_dir / "run.json").write_text(content)
    with pytest.raises(MissingInputError) as info:
        runs.read_run_info(model_dir, "mnist")
    assert str(info.value) == (f"{model_dir / 'run.json'}: {says}: train this model first "
                               "(python -m pipeline.stages.train dataset=mnist model=uni)")


@pytest.mark.parametrize("content, says", [
    ("[]", "the file holds list [], not an object"),
    ('{"dataset": "mnist"}', "files_sha256 is missing"),
])
def test_a_damaged_meta_json_is_one_line(tmp_path, content, says):
    from birnn.data import DataError
    from pipeline import prepared_data

    (tmp_path / "meta.json").write_text(content)
    with pytest.raises(DataError, match=f"meta.json: damaged: {re.escape(says)}: rerun the "
                                        "prepare stage"):
        prepared_data.read_meta(tmp_path, "mnist")


def test_damaged_test_and_details_json_are_one_line(tmp_path):
    from pipeline import files
    from pipeline.stages.compare import TEST_RESULT

    entry = {"param_count": 2282, "best": {"loss": 0.2, "accuracy": "high"},
             "last": {"loss": 0.2, "accuracy": 0.9}}
    with pytest.raises(MissingInputError, match=r"test.json: damaged: best.accuracy is "
                                                r"\"high\", not a number: rerun evaluate"):
        files.check_shape(tmp_path / "test.json", entry, TEST_RESULT, "rerun evaluate")
    (tmp_path / "details.json").write_text("{}")
    with pytest.raises(MissingInputError, match="details.json: damaged: best is missing"):
        files.read_json(tmp_path / "details.json", shape={"best": {"confusion": list}})
    entry["best"]["accuracy"] = True  # a bool is no number
    with pytest.raises(MissingInputError, match="best.accuracy is true, not a number"):
        files.check_shape(tmp_path / "test.json", entry, TEST_RESULT, "rerun evaluate")
