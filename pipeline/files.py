"""Writing outputs so that a failure never leaves half of one, and nothing lands outside the
outputs: files are written under a temporary name and renamed into place, folders are built in
a staging folder and swapped in whole (:func:`publish_dir`), which marks them as the
pipeline's. Both check the target first (pipeline.guard.output_paths), remove what a killed run left
beside it, and turn a full or read-only disk into a one-line error naming the target.
Unchanged arrays give byte-identical .npz files, so they keep their DVC hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from pipeline.guard import output_paths
from pipeline.guard.errors import MissingInputError, StageError, is_environmental

# Temporary names carry their writer (process id and a hash of the host name), so that the
# next run can tell a killed writer's leftovers from a live one's:
#   .<target>.new.<pid>.<host>.<random>               staging folder
#   .<target>.old.<pid>.<host>.<random>               the replaced folder on its way out
#   .<target>.<pid>.<host>.<random>.tmp<suffix>       a file being written
# (and the same without <pid>.<host>., as written before names carried them).
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_RANDOM = r"[a-z0-9_]{8}"  # tempfile's random part


def _owner() -> str:
    return f"{os.getpid()}.{_HOST}"


def _alive(pid: int, host: str) -> bool:
    if host != _HOST:  # another machine's (a shared filesystem): it may still be running
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_leftovers(target: Path) -> None:
    """Delete the temporary files and folders that killed writers of ``target`` left beside
    it. A replaced folder that was moved aside but not yet deleted is put back first if
    ``target`` itself is missing (the kill came between the two renames)."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(new\.|old\.)?"
                         rf"(?:(\d+)\.([0-9a-f]{{8}})\.)?{_RANDOM}(\.tmp.*)?$")
    try:
        siblings = list(target.parent.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return
    for path in siblings:
        match = pattern.match(path.name)
        if match is None or bool(match.group(1)) == bool(match.group(4)):
            continue  # not ours: a folder name needs new/old, a file name .tmp
        if match.group(2) and _alive(int(match.group(2)), match.group(3)):
            continue
        if match.group(1) == "old." and (path / target.name).is_dir() and not target.exists():
            os.replace(path / target.name, target)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def _writing(target: Path) -> Iterator[None]:
    """A full or read-only disk, or a missing permission, while writing ``target`` (or its
    temporary names beside it): a one-line error naming ``target``."""
    try:
        yield
    except OSError as exc:
        where = Path(exc.filename) if exc.filename else None
        if not is_environmental(exc) or (where is not None and not _is_written_as(where, target)):
            raise  # (another output's, written in the same block: its own handler names it)
        raise StageError(f"{_published(target)}: cannot write: {exc.strerror}") from None


def _is_written_as(path: Path, target: Path) -> bool:
    """Whether ``path`` is ``target`` or one of its temporary names (or inside one)."""
    return any(p == target or (p.parent == target.parent and p.name.startswith(f".{target.name}."))
               for p in (path, *path.parents))


def _published(path: Path) -> Path:
    """Where ``path`` will be once its folder is published: the name a user knows."""
    for staging, target in output_paths.staging_folders.items():
        if staging == path or staging in path.parents:
            return target / path.relative_to(staging)
    return path


NUMBER = "number"  # in a shape: an int or a float, not a bool


def _mismatch(value: Any, shape: Any, where: str) -> str | None:
    """How ``value`` differs from ``shape`` (a type, NUMBER, or a dict of key -> shape), or None."""
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return f"{where or 'the file'} holds {type(value).__name__} {_short(value)}, not an object"
        for key, inner in shape.items():
            if key not in value:
                return f"{where + '.' if where else ''}{key} is missing"
            found = _mismatch(value[key], inner, f"{where + '.' if where else ''}{key}")
            if found:
                return found
        return None
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)) if shape == NUMBER \
        else isinstance(value, shape)
    wanted = "a number" if shape == NUMBER else f"a {shape.__name__}"
    return None if ok else f"{where} is {_short(value)}, not {wanted}"


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_shape(path: Path, value: Any, shape: Any, hint: str,
                error: type[Exception] = MissingInputError) -> Any:
    """``value`` (read from ``path``) if it has ``shape``; else a one-line ``error`` saying
    what is wrong and ``hint``."""
    problem = _mismatch(value, shape, "")
    if problem:
        raise error(f"{path}: damaged: {problem}: {hint}")
    return value


def read_json(path: Path, hint: str = "run the earlier stages first (dvc repro)",
              shape: Any = dict) -> Any:
    """The JSON file ``path``, checked to have ``shape`` (by default: an object)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MissingInputError(f"{path}: no such file: {hint}") from None
    except (OSError, ValueError) as exc:
        raise MissingInputError(f"{path}: unreadable: {' '.join(str(exc).split())}") from None
    return check_shape(path, value, shape, hint)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success move it onto ``target``."""
    target = output_paths.resolve("output file", target)
    with _writing(target):
        remove_leftovers(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{_owner()}.", suffix=f".tmp{suffix}",
                                   dir=target.parent)
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        with _writing(target):
            yield tmp_path
            os.chmod(tmp_path, 0o644)  # mkstemp makes files private; outputs are ordinary files
            os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False) + "\n"


def write_json(target: str | os.PathLike, obj: Any) -> None:
    write_text(target, json_text(obj))


def save_npz(target: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """Save arrays as an uncompressed .npz. ``np.savez`` gives every member zipfile's fixed
    default timestamp, so the same arrays give the same bytes (tests/test_files.py)."""
    with atomic_path(target, suffix=".npz") as tmp:
        np.savez(tmp, **{name: np.ascontiguousarray(a) for name, a in arrays.items()})


def _replace_dir(staging: Path, target: Path) -> None:
    """Move a completely written folder ``staging`` onto ``target`` (replacing it).

    Two renames: the old folder is moved aside, the new one moved in, the old one deleted.
    """
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.{_owner()}.", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def publish_dir(target: str | os.PathLike, kind: str) -> Iterator[Path]:
    """Yield an empty folder next to ``target``; on success it replaces ``target`` whole,
    marked as the pipeline's output of ``kind`` (output_paths.MARKER, output_paths.KINDS); on
    failure it is deleted and ``target`` is left as it was. A non-empty ``target`` the
    pipeline did not write, or wrote as another kind, is refused."""
    target = output_paths.resolve("output folder", target)
    output_paths.check_replaceable("output folder", target, kind)
    with _writing(target):
        remove_leftovers(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.new.{_owner()}.",
                                        dir=target.parent))
    output_paths.staging_folders[staging] = target
    try:
        with _writing(target):
            yield staging
            (staging / output_paths.MARKER).write_text(output_paths.marker_text(kind),
                                                       encoding="utf-8")
            os.chmod(staging, 0o755)  # mkdtemp makes folders private
            _replace_dir(staging, target)
    finally:
        output_paths.staging_folders.pop(staging, None)
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
