"""The errors a user can cause, and how each is shown: one line, naming the key or file.

Everything else is a bug and keeps its traceback. This module sits at the bottom of the
dependency order: any module may raise these; only entry points decide how to exit.
"""

from __future__ import annotations

import logging
import re
import sys

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from birnn.data import DataError
from birnn.training import DivergenceError


class StageError(RuntimeError):
    """A stage cannot do its work because of its input; the message is one line."""


class ConfigError(ValueError):
    """An impossible configuration value; the message starts with the full key."""


class MissingInputError(RuntimeError):
    """A file an earlier stage should have written is missing or unreadable."""


def expected_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [
        StageError, MissingInputError, ConfigError, DataError, DivergenceError,
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


def one_line(exc: BaseException) -> str:
    """Describe an error in one line; OmegaConf errors are given as '<full key>: <reason>'."""
    cause = exc.__cause__ if isinstance(exc.__cause__, OmegaConfBaseException) else exc
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        text = f"config error: {cause.full_key}: {cause.msg}"
    elif isinstance(exc, (ConfigError, HydraException, OmegaConfBaseException)):
        text = f"config error: {str(exc).split('Config search path')[0]}"
        text += _launcher_hint(text)
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def exit_with_error(exc: BaseException) -> None:
    """Print ``error: <one line>`` and exit 1. Also for code that Hydra calls outside the task
    (a callback), where a raised exception would become a warning and the command go on."""
    logging.shutdown()  # flush the progress log before the error line
    print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
    raise SystemExit(1)
