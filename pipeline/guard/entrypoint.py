"""The Hydra entry point shared by the stages: compose, validate, run the task, and end every
expected failure in one line (``error: <what>``, exit 1); anything else keeps its traceback.

Before any work, every folder the stage will write or replace is checked
(pipeline.guard.output_paths): Hydra's own run and sweep folders as given on the command line before
Hydra creates them, the configured outputs after composition. A read-only or full disk is a
one-line error too. ``HYDRA_FULL_ERROR`` is set so that Hydra re-raises instead of printing its
own multi-line report. A URI with credentials, on the command line, in $MLFLOW_TRACKING_URI or
in the composed config, is refused before anything is written (pipeline.guard.credentials). In a
sweep job (``-m``) of a stage that passes ``on_job_failure``, a
failure is printed as ``error: job <n>: <what>``, recorded and not raised, so that the other
jobs carry on; the sweep's end hook (pipeline.sweeps.callback) then names the failed jobs and
exits non-zero. Without that hook (hydra.callbacks removed) the failure, recorded, is raised:
Hydra's sweeper then ends the sweep with it, exit 1.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sys
from pathlib import Path
from typing import Callable, Iterator

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from birnn import numerics
from pipeline import files, schema
from pipeline.guard import credentials, interrupts, output_paths
from pipeline.guard.errors import ConfigError, StageError, exit_with_error, is_expected, one_line
from pipeline.paths import CONF_DIR

Task = Callable[[DictConfig], "float | None"]
JobFailureHandler = Callable[[DictConfig, str], None]


@contextlib.contextmanager
def _reported() -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM, SIGHUP (pipeline.guard.interrupts)
        interrupts.run_hooks_and_exit(exc)
    except Exception as exc:
        if interrupts.is_lost_worker(exc):
            interrupts.run_hooks_and_exit(exc)
        if not is_expected(exc):
            raise  # a bug: keep its traceback
        exit_with_error(exc)


HYDRA_DIRS = ("hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir")
# The end hook that reports a sweep's failed jobs (conf/train.yaml, hydra.callbacks).
SWEEP_END_HOOK = "pipeline.sweeps.callback.SweepCallback"
# MLflow logs a store error with its SQL statement and a traceback before it raises it; the
# raised error is what the stage reports, in one line (a read-only mlflow.db, say).
QUIET_LOGGERS = ("mlflow.store.db.utils",)


# Hydra's command-line options that take a value (Hydra's own parser of them is private, so
# they are listed here, as of hydra-core 1.3): their value is not an override.
_VALUE_OPTIONS = frozenset({"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
                            "--experimental-rerun", "--package", "-p", "--cfg", "-c"})
_INFO_OPTIONS = frozenset({"--info", "-i"})  # an optional value, one of:
_INFO_CHOICES = frozenset({"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"})


def command_line_overrides(argv: list[str]) -> list[str]:
    """The overrides of a Hydra command line: its arguments that are not options or their
    values (``-m``, ``--config-name train``, ``--cfg=job`` ...)."""
    overrides, pending_value, optional_value = [], False, False
    for argument in argv:
        if pending_value or (optional_value and argument in _INFO_CHOICES):
            pending_value = optional_value = False
            continue
        optional_value = False
        if argument.startswith("-"):
            pending_value = argument in _VALUE_OPTIONS
            optional_value = argument in _INFO_OPTIONS
            continue
        overrides.append(argument)
    return overrides


def check_hydra_dirs(argv: list[str]) -> None:
    """Hydra's run and sweep folders, its files' subfolder and log files given on the command
    line, checked before Hydra creates them and writes its .hydra/ files and log there."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = command_line_overrides(argv)
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if key in HYDRA_DIRS and isinstance(override.value(), str):
            output_paths.check_hydra_dir(key, override.value())
        elif key.startswith("hydra."):
            output_paths.check_hydra_setting(key, override.value())


def check_outputs(config_name: str, cfg: DictConfig) -> None:
    """What the stage will write: inside the output areas, replaceable, writable; then what a
    killed run left beside it is removed."""
    hydra = HydraConfig.get()
    in_sweep = hydra.mode == RunMode.MULTIRUN
    output_dir = Path(hydra.runtime.output_dir)
    output_paths.check_hydra_dir("hydra.sweep.dir" if in_sweep else "hydra.run.dir",
                                 str(output_dir))
    outputs = output_paths.stage_outputs(config_name, cfg, output_dir if in_sweep else None)
    for output in outputs:
        output_paths.check_writable(output)
    for output in outputs:
        if output.replaced:
            files.remove_leftovers(output.path)


def select_numerics(argv: list[str]) -> None:
    """``numerics=native`` (or ``pinned``) on the command line: numpy's kernels are chosen when
    it loads, which this process has done, so it starts itself again under that mode
    (birnn.numerics) before Hydra writes anything. A config file that sets it is checked
    after composition (:func:`check_numerics`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(command_line_overrides(argv)):
        if override.key_or_group != "numerics":
            continue
        if override.is_sweep_override():
            raise ConfigError("numerics: cannot be swept; a sweep runs one mode (numerics="
                              f"{' or numerics='.join(numerics.MODES)})")
        wanted = str(override.value())
        if wanted in numerics.MODES and wanted != numerics.requested_mode():
            sys.stdout.flush()
            sys.stderr.flush()
            os.execve(sys.executable, sys.orig_argv, numerics.environment(wanted))


def check_numerics(cfg: DictConfig) -> None:
    """The process runs the numerics the config asks for; a machine that cannot run the pin
    says so in one line (its runs record it: numerics=unpinned)."""
    if "numerics" not in cfg:
        return
    state = numerics.require(cfg.numerics)
    if state.mode == "unpinned":
        logging.getLogger(__name__).warning(
            "numerics: not pinned, as %s: results are exact on this machine but not the same "
            "bytes as on an x86-64 machine with AVX2", state.reason)


@contextlib.contextmanager
def _job_failure_recorded(cfg: DictConfig, on_job_failure: JobFailureHandler,
                          slurm_job: bool = False) -> Iterator[None]:
    try:
        yield
    except interrupts.Terminated as exc:
        if not slurm_job:
            interrupts.exit_if_orphaned()
            raise
        # Slurm stopped this job (scancel, its time limit): its run ended KILLED. The job
        # returns, as a failed one does, so that submitit records a result and the sweep's
        # process, waiting for every job, carries on with the others.
        print(f"error: job {HydraConfig.get().job.num}: {exc}, sent by Slurm (scancel or the "
              "time limit): its run, if it had started, ended KILLED", file=sys.stderr,
              flush=True)
    except Exception as exc:
        expected = is_expected(exc)
        error = one_line(exc) if expected else f"{type(exc).__name__}: {one_line(exc)}"
        num = HydraConfig.get().job.num
        if not expected:  # a bug: keep its traceback, in the job's log
            logging.getLogger(__name__).exception("job %s failed", num)
        reported_at_end = _has_sweep_end_hook()
        if reported_at_end:
            print(f"error: job {num}: {error}", file=sys.stderr, flush=True)
        try:
            on_job_failure(cfg, error)
        except Exception as record_exc:  # the store itself may be what failed
            print(f"error: job {num}: could not record the failure: {one_line(record_exc)}",
                  file=sys.stderr, flush=True)
        if not reported_at_end:  # no end hook would say so: the sweep must fail, Hydra's way
            raise StageError(f"job {num}: {error}") from None


def _has_sweep_end_hook() -> bool:
    callbacks = HydraConfig.get().get("callbacks") or {}
    return any(callback.get("_target_") == SWEEP_END_HOOK for callback in callbacks.values())


def stage(config_name: str, on_job_failure: JobFailureHandler | None = None,
          config_dir: Path = CONF_DIR) -> Callable[[Task], Callable[[], "float | None"]]:
    """Turn ``task(cfg)`` into the stage's ``main()``: compose <config_dir>/<config_name>.yaml
    (default: the pipeline's conf/) with the command-line overrides, validate the values, run the task and return its objective (what
    a Hydra sweeper such as Optuna minimises; a failed sweep job returns +inf, the worst loss:
    Optuna 2's sweeper aborts the whole search on a NaN)."""

    def decorate(task: Task) -> Callable[[], "float | None"]:
        @hydra.main(version_base="1.3", config_path=str(config_dir), config_name=config_name)
        def hydra_app(cfg: DictConfig) -> float | None:
            with _reported():  # before a sweep job's failure is recorded in that very store
                credentials.check_config(cfg)
            in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
            slurm_job = in_sweep and interrupts.in_slurm_job()
            if slurm_job:  # after submitit's own handlers, which ignore SIGTERM
                interrupts.install_slurm_job_handlers()
            elif in_sweep:
                interrupts.exit_with_parent()
            if in_sweep and on_job_failure is not None:
                with _job_failure_recorded(cfg, on_job_failure, slurm_job):
                    schema.validate(cfg)
                    check_numerics(cfg)
                    check_outputs(config_name, cfg)
                    return task(cfg)
                return math.inf
            with _reported():
                schema.validate(cfg)
                check_numerics(cfg)
                check_outputs(config_name, cfg)
                return task(cfg)

        @functools.wraps(task)
        def main() -> float | None:
            os.environ["HYDRA_FULL_ERROR"] = "1"
            for name in QUIET_LOGGERS:  # a filter: MLflow's logging setup resets levels
                logging.getLogger(name).addFilter(lambda record: False)
            interrupts.install_signal_handlers()
            with _reported():
                # Before Hydra writes anything (its output folder, .hydra/*.yaml, the log).
                credentials.check_arguments(sys.argv[1:])
                credentials.check_environment()
                credentials.check_config_files(
                    [config_dir, *credentials.extra_config_dirs(sys.argv[1:])])
                check_hydra_dirs(sys.argv[1:])
                select_numerics(sys.argv[1:])
                interrupts.mark_sweep_process()
                objective = hydra_app()
                interrupts.raise_if_lost()  # a stop signal must not end in exit 0
                return objective

        return main

    return decorate
