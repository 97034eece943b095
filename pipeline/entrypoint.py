"""The Hydra entry point shared by the stages: compose, validate, run the task, and end every
expected failure in one line (``error: <what>``, exit 1); anything else keeps its traceback.

``HYDRA_FULL_ERROR`` is set so that Hydra re-raises instead of printing its own multi-line
report. In a sweep job (``-m``) of a stage that passes ``on_job_failure``, a failure is printed
as ``error: job <n>: <what>``, recorded and not raised, so that the other jobs carry on; the
sweep's end hook (pipeline.sweeps.callback) then names the failed jobs and exits non-zero.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sys
from typing import Callable, Iterator

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from pipeline import interrupts, schema
from pipeline.errors import exit_with_error, expected_errors, one_line
from pipeline.paths import CONF_DIR

Task = Callable[[DictConfig], "float | None"]
JobFailureHandler = Callable[[DictConfig, str], None]


@contextlib.contextmanager
def _reported() -> Iterator[None]:
    try:
        yield
    except expected_errors() as exc:
        exit_with_error(exc)
    except KeyboardInterrupt:
        interrupts.run_hooks_and_exit()


@contextlib.contextmanager
def _job_failure_recorded(cfg: DictConfig, on_job_failure: JobFailureHandler) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        expected = isinstance(exc, expected_errors())
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
          ) -> Callable[[Task], Callable[[], "float | None"]]:
    """Turn ``task(cfg)`` into the stage's ``main()``: compose conf/<config_name>.yaml with the
    command-line overrides, validate the values, run the task and return its objective (what
    a Hydra sweeper such as Optuna minimises; a failed sweep job returns +inf, the worst loss:
    Optuna 2's sweeper aborts the whole search on a NaN)."""

    def decorate(task: Task) -> Callable[[], "float | None"]:
        @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)
        def hydra_app(cfg: DictConfig) -> float | None:
            in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
            if in_sweep and on_job_failure is not None:
                with _job_failure_recorded(cfg, on_job_failure):
                    schema.validate(cfg)
                    return task(cfg)
                return math.inf
            with _reported():
                schema.validate(cfg)
                return task(cfg)

        @functools.wraps(task)
        def main() -> float | None:
            os.environ["HYDRA_FULL_ERROR"] = "1"
            with _reported():
                return hydra_app()

        return main

    return decorate
