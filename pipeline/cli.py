"""Entry-point wrapper shared by the stages: a Hydra app whose expected failures end in one line.

Hydra prints its own multi-line report (and a stripped traceback for errors raised in the task)
unless HYDRA_FULL_ERROR is set, in which case it re-raises. We set it and catch the errors that
are about the input (configuration, data, tracking, a diverging run): composition errors around
the Hydra app, the rest inside the task (else Hydra adds an "Error executing job" line). Both
are printed as

    error: <what went wrong, naming the key or file>

on stderr with exit status 1. Anything else is a bug and keeps its full traceback.

Sweeps (``-m``). Hydra's multirun stops at a job's exception (and our exit would end it at
once), so a stage that supports sweeps passes ``on_job_failure``: in a sweep job, any error
is printed as ``error: job <n>: <what>`` (unexpected ones with their traceback in the job's
log), handed to ``on_job_failure(cfg, error)`` to be recorded, and not raised, so that the
other jobs carry on. The sweep's end hook (pipeline.sweep_callback) then names the failed jobs
and makes the command exit non-zero. A single run behaves as above.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sys
from typing import Callable, Iterator

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from birnn.data import DataError
from birnn.training import DivergenceError
from pipeline import schema
from pipeline.io import MissingInputError
from pipeline.paths import CONF_DIR


class StageError(RuntimeError):
    """A stage cannot do its work because of its input; the message is one line."""


def _expected_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [
        StageError, MissingInputError, schema.ConfigError, DataError, DivergenceError,
        HydraException, OmegaConfBaseException,
    ]
    # A tracking server that fails after the start-up probe (only stages that use MLflow
    # have imported it; importing it here would cost the prepare stage a second and a half).
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
    elif isinstance(exc, (schema.ConfigError, HydraException, OmegaConfBaseException)):
        text = f"config error: {str(exc).split('Config search path')[0]}"
        text += _launcher_hint(text)
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


@contextlib.contextmanager
def _reported() -> Iterator[None]:
    try:
        yield
    except _expected_errors() as exc:
        exit_with_error(exc)
    except KeyboardInterrupt:
        for hook in _on_interrupt:
            try:
                hook()
            except Exception:  # interrupted twice, or the store is gone: exit regardless
                pass
        print("error: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


# Called on Ctrl-C before the stage exits (the sweep hook ends its parent run KILLED).
_on_interrupt: list[Callable[[], None]] = []


def on_interrupt(hook: Callable[[], None]) -> None:
    _on_interrupt.append(hook)


def exit_with_error(exc: BaseException) -> None:
    """Print ``error: <one line>`` and exit 1, from where raising would not reach the stage's
    error handler (Hydra turns an exception in a callback into a warning and carries on)."""
    logging.shutdown()  # flush the progress log before the error line
    print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
    raise SystemExit(1)


JobFailureHandler = Callable[[DictConfig, str], None]


@contextlib.contextmanager
def _job_failure_recorded(cfg: DictConfig, on_job_failure: JobFailureHandler) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        expected = isinstance(exc, _expected_errors())
        error = one_line(exc) if expected else f"{type(exc).__name__}: {one_line(exc)}"
        num = HydraConfig.get().job.num
        if not expected:  # a bug: keep its traceback, in the job's log
            logging.getLogger(__name__).exception("job %s failed", num)
        print(f"error: job {num}: {error}", file=sys.stderr, flush=True)
        try:
            on_job_failure(cfg, error)
        except Exception as record_exc:  # the store itself may be what failed
            print(f"error: job {num}: could not record the failure: {one_line(record_exc)}",
                  file=sys.stderr, flush=True)


def stage(config_name: str, on_job_failure: JobFailureHandler | None = None
          ) -> Callable[[Callable[[DictConfig], None]], Callable[[], None]]:
    """Turn ``task(cfg)`` into the stage's ``main()``: compose conf/<config_name>.yaml with the
    command-line overrides, validate the values, run, and report expected errors in one line.
    ``on_job_failure``: see the module docstring (sweeps)."""

    def decorate(task: Callable[[DictConfig], None]) -> Callable[[], None]:
        @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)
        def hydra_app(cfg: DictConfig) -> None:
            in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
            guard = (_job_failure_recorded(cfg, on_job_failure)
                     if in_sweep and on_job_failure is not None else _reported())
            with guard:
                schema.validate(cfg)
                task(cfg)

        @functools.wraps(task)
        def main() -> None:
            os.environ["HYDRA_FULL_ERROR"] = "1"
            with _reported():
                hydra_app()

        return main

    return decorate
