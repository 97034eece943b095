"""Fixtures shared by the test modules that run the real stages."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline_testkit import stage


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory) -> Path:
    """The shipped MNIST prepared once per test session (by the real prepare stage) into a
    temporary folder; tests only read it."""
    out = tmp_path_factory.mktemp("data") / "prepared"
    result = stage("prepare", f"paths.prepared_dir={out}", timeout=120)
    assert result.returncode == 0, result.stderr
    return out
