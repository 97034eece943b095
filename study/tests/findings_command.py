"""``python -m study.findings`` through its real entry point, in the tests' working directory."""

from __future__ import annotations

import sys

from pipeline_testkit import ROOT, run


def findings_command(*overrides: str, timeout: float = 120):
    # The study is not installed: the checkout's root makes `study` importable.
    return run([sys.executable, "-m", "study.findings", *overrides], timeout=timeout,
               PYTHONPATH=str(ROOT))
