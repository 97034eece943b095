"""Fixtures shared by the test modules (tests/, study/tests/) that run the real stages, and the
session's working conditions: every test runs in a temporary working directory whose folders
the stages may write to ($BIRNN_OUTPUT_ROOTS), and the session fails if the checkout gained Hydra's outputs/ or
MLflow's mlruns/ meanwhile (tests write only to temporary folders)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from pipeline.guard import locks
from pipeline.guard.output_paths import ROOTS_ENV
from pipeline_testkit import ROOT, stage

# Folders that a stage or MLflow creates in its working directory.
WATCHED = ("outputs", "mlruns")
_BEFORE = pytest.StashKey[set]()
_LOCKS_BEFORE = pytest.StashKey[set]()


def _entries() -> set[str]:
    return {str(path.relative_to(ROOT)) for name in WATCHED for path in (ROOT / name).glob("*/*")}


def _locks() -> set[Path]:
    return set(locks.LOCKS.glob("*.lock"))


def _is_controller(config) -> bool:
    return not hasattr(config, "workerinput")   # not an xdist worker


def pytest_sessionstart(session) -> None:
    session.config.stash[_BEFORE] = _entries()
    session.config.stash[_LOCKS_BEFORE] = _locks()


def _remove_new_locks(before: set[Path]) -> None:
    """The writers' lock files the session's stages left in the system's temporary folder
    (pipeline.locks.exclusive keeps them, as removing a lock file races with its next
    user); one still held by a process outside the session stays."""
    for lock in _locks() - before:
        with open(lock, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            lock.unlink(missing_ok=True)


def pytest_sessionfinish(session, exitstatus) -> None:
    if _is_controller(session.config):   # after every xdist worker
        _remove_new_locks(session.config.stash.get(_LOCKS_BEFORE, set()))
    gained = sorted(_entries() - session.config.stash.get(_BEFORE, set()))
    if gained:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"error: the tests wrote into the checkout: {', '.join(gained)}",
                                red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED



@pytest.fixture(scope="session", autouse=True)
def temporary_workspace(tmp_path_factory) -> Path:
    """The session's basetemp is where outputs may go; its cwd/ is the working directory."""
    base = tmp_path_factory.getbasetemp()
    os.environ[ROOTS_ENV] = str(base)
    cwd = base / "cwd"
    cwd.mkdir(exist_ok=True)
    os.chdir(cwd)
    return cwd


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory) -> Path:
    """The shipped MNIST prepared once per test session (by the real prepare stage) into a
    temporary folder; tests only read it."""
    out = tmp_path_factory.mktemp("data") / "prepared"
    result = stage("prepare", f"paths.prepared_dir={out}", timeout=120)
    assert result.returncode == 0, result.stderr
    return out
