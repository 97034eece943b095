"""The errors a user can cause, and how each is shown: one line, naming the key or file.

Everything else is a bug and keeps its traceback. This module sits at the bottom of the
dependency order: any module may raise these; only entry points decide how to exit.
"""

from __future__ import annotations

import errno
import logging
import re
import sys

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from birnn.data import DataError
from birnn.numerics import NumericsError
from birnn.training import DivergenceError


class StageError(RuntimeError):
    """A stage cannot do its work because of its input; the message is one line."""


class ConfigError(ValueError):
    """An impossible configuration value; the message starts with the full key."""


class MissingInputError(RuntimeError):
    """A file an earlier stage should have written is missing or unreadable."""


# OS errors that come from the machine, not from the code: a read-only or full disk, missing
# permissions. Any other OSError (no such file where the code expected one, say) is a bug.
ENVIRONMENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC,
                                errno.EDQUOT, errno.EIO, errno.EMFILE, errno.ENFILE})


def is_environmental(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS


def is_expected(exc: BaseException) -> bool:
    """An error a user or the machine can cause: shown in one line, no traceback."""
    return isinstance(exc, expected_errors()) or is_environmental(exc)


def expected_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [
        StageError, MissingInputError, ConfigError, DataError, DivergenceError, NumericsError,
        HydraException, OmegaConfBaseException,
    ]
    # A tracking server that fails after the start-up probe. Only stages that use MLflow have
    # imported it; importing it here would cost the prepare stage a second and a half.
    if "mlflow.exceptions" in sys.modules:
        errors.append(sys.modules["mlflow.exceptions"].MlflowException)
    return tuple(errors)


# Hydra launchers that come from plugin packages (conf/hydra/launcher/ presets extend them).
LAUNCHER_PACKAGES = {"joblib": "hydra-joblib-launcher", "submitit_local": "hydra-submitit-launcher",
                     "submitit_slurm": "hydra-submitit-launcher", "ray": "hydra-ray-launcher",
                     "ray_aws": "hydra-ray-launcher"}


def _launcher_hint(text: str) -> str:
    """' (...)': which package provides a launcher Hydra could not find, if it is a plugin's."""
    missing = re.search(r"Could not (?:load|find) 'hydra/launcher/(\w+)'", text)
    package = LAUNCHER_PACKAGES.get(missing.group(1)) if missing else None
    return (f" (launcher {missing.group(1)!r} comes from the {package} package, not installed "
            "here: see the README, 'Sweeps past one machine')") if package else ""


# Config errors whose cause a user would not guess from Hydra's or OmegaConf's words: the
# pattern, and the line that replaces the message ({0}: the pattern's group).
CONFIG_HINTS = (
    (r"Could not override 'data'\.\s+No match in the defaults list\..*?\+data=(\S+)",
     "config error: data={0}: this stage takes the dataset as dataset={0} (data= is the "
     "prepare stage's)"),
    (r"Environment variable '(MLFLOW_TRACKING_URI)' not found",
     "config error: tracking.uri: tracking=server needs the server's address: export "
     "{0}=http://<host>:<port> or add tracking.uri=http://<host>:<port>"),
)


def _hinted(text: str) -> str:
    for pattern, line in CONFIG_HINTS:
        found = re.search(pattern, text, re.S)
        if found:
            return line.format(*found.groups())
    return text + _launcher_hint(text)


def one_line(exc: BaseException) -> str:
    """Describe an error in one line; OmegaConf errors are given as '<full key>: <reason>'."""
    cause = exc.__cause__ if isinstance(exc.__cause__, OmegaConfBaseException) else exc
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        # (the message's own 'full_key: ... object_type=...' trailer repeats the key)
        text = _hinted(f"config error: {cause.full_key}: {cause.msg.split('full_key:')[0]}")
    elif isinstance(exc, (ConfigError, HydraException, OmegaConfBaseException)):
        text = _hinted(f"config error: {str(exc).split('Config search path')[0]}")
    elif isinstance(exc, OSError) and exc.strerror:
        names = [str(name) for name in (exc.filename, exc.filename2) if name is not None]
        text = ": ".join([*names, exc.strerror])
    else:
        text = _without_sql(str(exc)) or type(exc).__name__
    return " ".join(text.split())


def _without_sql(text: str) -> str:
    """SQLAlchemy's errors (through MLflow) carry the statement, its parameters and a link
    after the reason: '(sqlite3.OperationalError) attempt to write a readonly database
    [SQL: INSERT ...] [parameters: ...] (Background on this error at: ...)'. Keep the reason
    (without SQLAlchemy's advice on autoflush, which is about its own API)."""
    text = re.split(r"\[SQL: |\(Background on this error at:", text, maxsplit=1)[0]
    return re.sub(r"\(raised as a result of Query-invoked autoflush;[^)]*\)", "", text)


def exit_with_error(exc: BaseException) -> None:
    """Print ``error: <one line>`` and exit 1. Also for code that Hydra calls outside the task
    (a callback), where a raised exception would become a warning and the command go on."""
    logging.shutdown()  # flush the progress log before the error line
    print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
    raise SystemExit(1)
