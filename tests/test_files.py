"""Outputs are written whole or not at all, and unchanged arrays give unchanged bytes."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import files
from pipeline.guard import locks
from pipeline_testkit import ROOT


def test_save_npz_gives_the_same_bytes_for_the_same_arrays(tmp_path):
    arrays = {"images": np.arange(28 * 28, dtype=np.uint8).reshape(1, 28, 28),
              "labels": np.array([7], dtype=np.int64)}
    files.save_npz(tmp_path / "a.npz", arrays)
    time.sleep(2.1)  # zip timestamps have a two-second resolution
    files.save_npz(tmp_path / "b.npz", arrays)
    digest = [hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("a.npz", "b.npz")]
    assert digest[0] == digest[1]
    with np.load(tmp_path / "a.npz") as loaded:
        assert set(loaded) == set(arrays) and (loaded["images"] == arrays["images"]).all()


def test_publish_dir_replaces_the_folder_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out"
    with files.publish_dir(target, "report") as staging:
        (staging / "a.txt").write_text("first")
    assert (target / "a.txt").read_text() == "first"
    with pytest.raises(RuntimeError):
        with files.publish_dir(target, "report") as staging:
            (staging / "a.txt").write_text("second")
            raise RuntimeError("stage failed")
    assert (target / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left


def test_write_text_leaves_no_temporary_file(tmp_path):
    files.write_json(tmp_path / "m.json", {"a": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def _pytest_session(tmp_path: Path, test_source: str, *options: str, **env: str) -> Path:
    """Run ``test_source`` as a one-test pytest session with the project's settings
    (pyproject.toml); the test writes a path to $WHERE, which is returned."""
    (tmp_path / "test_one.py").write_text(test_source)
    where = tmp_path / "where.txt"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir",
         str(tmp_path), "-p", "no:xdist", "-p", "no:cacheprovider", "-o", "addopts=",
         *options, str(tmp_path / "test_one.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "WHERE": str(where), **env})
    assert result.returncode == 0, result.stdout[-2000:]
    return Path(where.read_text())


def test_a_test_session_removes_the_lock_files_of_its_stages(tmp_path):
    # Stages keep a writer's lock file in the system's temporary folder (locks.exclusive);
    # the project's conftest.py removes those a session made once it ends.
    made = _pytest_session(
        tmp_path,
        "import os\n"
        "from pipeline.guard import locks\n"
        "def test_writes(tmp_path):\n"
        "    before = set(locks.LOCKS.glob('*.lock'))\n"
        "    with locks.exclusive(tmp_path / 'out', 'wait'):\n"
        "        pass\n"
        "    [made] = set(locks.LOCKS.glob('*.lock')) - before\n"
        "    open(os.environ['WHERE'], 'w').write(str(made))\n",
        "-p", "conftest", PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    assert made.parent == locks.LOCKS and not made.exists()


def test_a_green_test_run_leaves_no_temporary_folder(tmp_path):
    # The project's pytest settings (pyproject.toml) on a one-test session: its tmp_path is
    # gone once the session passed.
    used = _pytest_session(
        tmp_path,
        "import os\n"
        "def test_writes(tmp_path):\n"
        "    (tmp_path / 'big').write_bytes(b'0' * 1000)\n"
        "    open(os.environ['WHERE'], 'w').write(str(tmp_path))\n")
    assert not used.exists() and not used.parent.exists()  # the session's basetemp too
