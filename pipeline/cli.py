"""Entry-point wrapper shared by the stages: a Hydra app whose expected failures end in one line.

Hydra prints its own multi-line report (and a stripped traceback for errors raised in the task)
unless HYDRA_FULL_ERROR is set, in which case it re-raises. We set it and catch the errors that
are about the input (configuration, data, tracking, a diverging run): composition errors around
the Hydra app, the rest inside the task (else Hydra adds an "Error executing job" line). Both
are printed as

    error: <what went wrong, naming the key or file>

on stderr with exit status 1. Anything else is a bug and keeps its full traceback.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from typing import Callable, Iterator

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from pipeline import schema
from pipeline.paths import CONF_DIR


class StageError(RuntimeError):
    """A stage cannot do its work because of its input; the message is one line."""


def _expected_errors() -> tuple[type[BaseException], ...]:
    # Imported here, not at the top: pipeline.io and birnn import nothing from us.
    from birnn.data import DataError
    from pipeline.io import MissingInputError

    errors: list[type[BaseException]] = [
        StageError, MissingInputError, schema.ConfigError, DataError, HydraException,
        OmegaConfBaseException,
    ]
    try:
        from birnn.training import DivergenceError

        errors.append(DivergenceError)
    except ImportError:
        pass
    # A tracking server that fails after the start-up probe (only stages that use MLflow
    # have imported it; importing it here would cost the prepare stage a second and a half).
    if "mlflow.exceptions" in sys.modules:
        errors.append(sys.modules["mlflow.exceptions"].MlflowException)
    return tuple(errors)


def one_line(exc: BaseException) -> str:
    """Describe an error in one line; OmegaConf errors are given as '<full key>: <reason>'."""
    cause = exc.__cause__ if isinstance(exc.__cause__, OmegaConfBaseException) else exc
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        text = f"config error: {cause.full_key}: {cause.msg}"
    elif isinstance(exc, (schema.ConfigError, HydraException, OmegaConfBaseException)):
        text = f"config error: {str(exc).split('Config search path')[0]}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


@contextlib.contextmanager
def _reported() -> Iterator[None]:
    try:
        yield
    except _expected_errors() as exc:
        logging.shutdown()  # flush the progress log before the error line
        print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


def stage(config_name: str) -> Callable[[Callable[[DictConfig], None]], Callable[[], None]]:
    """Turn ``task(cfg)`` into the stage's ``main()``: compose conf/<config_name>.yaml with the
    command-line overrides, validate the values, run, and report expected errors in one line."""

    def decorate(task: Callable[[DictConfig], None]) -> Callable[[], None]:
        @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)
        def hydra_app(cfg: DictConfig) -> None:
            with _reported():
                schema.validate(cfg)
                task(cfg)

        @functools.wraps(task)
        def main() -> None:
            os.environ["HYDRA_FULL_ERROR"] = "1"
            with _reported():
                hydra_app()

        return main

    return decorate
