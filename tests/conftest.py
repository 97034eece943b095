"""Shared test setup: make the in-repo packages (birnn, pipeline) importable without installing."""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
