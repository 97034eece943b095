"""Writing outputs so that a failure never leaves half of one: files are written under a
temporary name and renamed into place, folders are built in a staging folder and swapped in
whole (:func:`publish_dir`). Unchanged arrays give byte-identical .npz files, so they keep
their DVC hash.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from pipeline.errors import MissingInputError


def read_json(path: Path, hint: str = "run the earlier stages first (dvc repro)") -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MissingInputError(f"{path}: no such file: {hint}") from None
    except (OSError, ValueError) as exc:
        raise MissingInputError(f"{path}: unreadable: {' '.join(str(exc).split())}") from None


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success move it onto ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}",
                               dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)  # mkstemp makes files private; outputs are ordinary files
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: str | os.PathLike, obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_npz(target: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """Save arrays as an uncompressed .npz. ``np.savez`` gives every member zipfile's fixed
    default timestamp, so the same arrays give the same bytes (tests/test_files.py)."""
    with atomic_path(target, suffix=".npz") as tmp:
        np.savez(tmp, **{name: np.ascontiguousarray(a) for name, a in arrays.items()})


def _replace_dir(staging: Path, target: Path) -> None:
    """Move a completely written folder ``staging`` onto ``target`` (replacing it).

    Two renames: the old folder is moved aside, the new one moved in, the old one deleted.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def publish_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder next to ``target``; on success it replaces ``target`` whole,
    on failure it is deleted and ``target`` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.new.", dir=target.parent))
    try:
        yield staging
        os.chmod(staging, 0o755)  # mkdtemp makes folders private
        _replace_dir(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
