"""Credentials in URIs never leave the process: the user info of a URI
(``http://user:password@host`` -> ``http://***@host``) and token-like query parameters
(``?token=...``, ``access_token``, ``password``, ``key``, ``sig``, ...) become ``***`` wherever the
pipeline records or prints text: MLflow params and tags (pipeline.tracking.store), files it
writes, Hydra's saved configs (:func:`scrub_hydra_outputs`), log records, warnings and
tracebacks (:func:`install`). MLflow's own MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN keep
credentials out of URIs altogether (README, "What happens when things go wrong").

This module imports nothing of the project: errors.py and files.py may use it.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Any, Iterable

REDACTED = "***"

# scheme://<user info>@ ; the user info stops at what cannot be in it unencoded (and at quotes,
# so that a URI inside JSON or YAML text is redacted without eating the text around it).
# Hydra gives a sweep job's overrides with their colons escaped (http\://user\:password@host),
# and JSON escapes those backslashes again.
_USER_INFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.\-]*\\*://)[^/\s?#\"'<>]*@")
_NAME_CHARS = r"[^=&;#\s\"'<>?]"
_SECRET_QUERY = re.compile(
    rf"([?&;]{_NAME_CHARS}*(?:token|passw|pwd|secret|key|sig|auth|credential){_NAME_CHARS}*=)"
    r"[^&;#\s\"'<>]*", re.IGNORECASE)


def redact(text: Any) -> Any:
    """``text`` with every credential in a URI replaced by ``***``; non-strings unchanged."""
    if not isinstance(text, str) or ("@" not in text and "=" not in text):
        return text
    text = _USER_INFO.sub(rf"\1{REDACTED}@", text)
    return _SECRET_QUERY.sub(rf"\1{REDACTED}", text)


def rewrite_redacted(path: Path) -> bool:
    """Rewrite text file ``path`` redacted, atomically, if it holds a credential."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    clean = redact(text)
    if clean == text:
        return False
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(clean)
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return True


def _hydra_files() -> Iterable[Path]:
    """The config files Hydra saved for this command: a job's <output dir>/.hydra/*.yaml (and
    its sweep's multirun.yaml); in the process that launched a sweep, once its jobs are over,
    multirun.yaml and every job's .hydra/ (a job that died before its task started could not
    scrub its own; while jobs run, another job's files may be half-written)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():
        return
    hydra = HydraConfig.get()
    subdir = hydra.output_subdir
    output_dir = OmegaConf.select(hydra, "runtime.output_dir", default=None)  # a job's
    if hydra.mode == RunMode.MULTIRUN:
        sweep_dir = Path(str(hydra.sweep.dir))
        yield sweep_dir / "multirun.yaml"
        if output_dir is None and subdir is not None:
            yield from sweep_dir.glob(f"*/{subdir}/*.yaml")
    if output_dir and subdir is not None:
        yield from (Path(str(output_dir)) / str(subdir)).glob("*.yaml")


def scrub_hydra_outputs() -> None:
    """Redact what Hydra saved (config.yaml, overrides.yaml, hydra.yaml hold the command line's
    values as typed, e.g. ``tracking.uri=http://user:password@host``). Hydra writes them before
    the task starts and offers no hook in between, so the entry point calls this first thing in
    the task, and again when the command ends."""
    try:
        for path in _hydra_files():
            if path.is_file():
                rewrite_redacted(path)
    except Exception as exc:  # never let scrubbing hide the stage's own outcome
        logging.getLogger(__name__).warning("could not redact Hydra's saved configs: %s",
                                            redact(str(exc)))


# ----------------------------------------------------------------------------- process-wide
_installed = False


def _redacting_record_factory(base):
    def factory(*args, **kwargs) -> logging.LogRecord:
        record = base(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: let the handler report it as usual
            return record
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
            # The formatter would render the traceback later from exc_info; render it now,
            # redacted, so that it uses this text instead.
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info))
                                     .rstrip("\n"))
        return record

    factory._redacting = True  # type: ignore[attr-defined]
    return factory


class _RedactingStream:
    """sys.stdout or sys.stderr, redacting what is written (MLflow prints run links built from
    the tracking URI straight to stdout)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        return self._stream.write(redact(text))

    def writelines(self, lines):
        self._stream.writelines(redact(line) for line in lines)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def install() -> None:
    """Redact every log record, warning, uncaught traceback and everything written to
    sys.stdout and sys.stderr by this process (idempotent).

    A log record factory, unlike a handler's filter, survives Hydra replacing the logging
    handlers of every job."""
    global _installed
    base = logging.getLogRecordFactory()
    if not getattr(base, "_redacting", False):
        logging.setLogRecordFactory(_redacting_record_factory(base))
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _RedactingStream):
            setattr(sys, name, _RedactingStream(stream))
    if _installed:
        return
    _installed = True
    show_warning = warnings.showwarning

    def redacted_warning(message, category, filename, lineno, file=None, line=None):
        show_warning(redact(str(message)), category, filename, lineno, file, line)

    warnings.showwarning = redacted_warning

    def redacted_excepthook(kind, value, tb):  # a bug's traceback: kept, but redacted
        sys.stderr.write(redact("".join(traceback.format_exception(kind, value, tb))))
        sys.stderr.flush()

    sys.excepthook = redacted_excepthook
