"""Fixtures shared by the test modules (tests/, study/tests/) that run the real stages, and the
session's working conditions: every test runs in a temporary working directory whose folders
the stages may write to ($BIRNN_OUTPUT_ROOTS), and the session fails if the checkout gained Hydra's outputs/ or
MLflow's mlruns/ meanwhile (tests write only to temporary folders)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.output_paths import ROOTS_ENV
from pipeline_testkit import ROOT, stage

# Folders that a stage or MLflow creates in its working directory.
WATCHED = ("outputs", "mlruns")
_BEFORE = pytest.StashKey[set]()


def _entries() -> set[str]:
    return {str(path.relative_to(ROOT)) for name in WATCHED for path in (ROOT / name).glob("*/*")}


def pytest_sessionstart(session) -> None:
    session.config.stash[_BEFORE] = _entries()


def pytest_sessionfinish(session, exitstatus) -> None:
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
