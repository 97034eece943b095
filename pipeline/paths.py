"""Where things are: the project root and paths relative to it.

Relative paths in the configuration are resolved against the project root (the folder holding
this package), not the working directory, so a stage gives the same result wherever it is
started from (Hydra 1.3 does not change directory; DVC runs stages from the root anyway).
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_ROOT / "conf"


def project_path(path: str | os.PathLike) -> Path:
    """An absolute path: ``path`` itself if absolute, else ``PROJECT_ROOT / path``."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path


def tracking_root() -> Path:
    """The folder that holds the default SQLite tracking store.

    DVC sets DVC_ROOT for every stage command, and for queued or ``--temp`` experiments (which
    run in a copy under .dvc/tmp/exps/) it points to the original repository: anchoring there
    keeps every run in one database instead of one per throw-away copy.
    """
    return Path(os.environ.get("DVC_ROOT") or PROJECT_ROOT).resolve()


def portable(text: str) -> str:
    """``text`` with the absolute path of the project root (and of DVC_ROOT's) made relative to
    it: ``sqlite:////home/me/birnn/mlflow.db`` becomes ``sqlite:///mlflow.db``. What a stage
    writes must not depend on where the checkout is: a DVC-cached file would differ in every
    clone, and every stage after it would rerun."""
    roots = {str(root).rstrip("/") for root in (PROJECT_ROOT, PROJECT_ROOT.resolve(),
                                                tracking_root())}
    for root in sorted(roots, key=len, reverse=True):  # a DVC copy lies inside DVC_ROOT
        text = text.replace(root + "/", "")
    return text
