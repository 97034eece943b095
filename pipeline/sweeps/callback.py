"""Hydra's hooks around a sweep (registered in conf/train.yaml under hydra.callbacks).

Start: check the store answers, create the experiment and the sweep's parent run once, before
any job (parallel jobs would race). Each job's end, in the job's process: ``job_seconds`` on its
run, the sweep's progress line. End: count the jobs' runs by status, record the timing on the
parent, end it, print one summary line; exit 1 naming the jobs that failed. Hydra turns an
exception in a callback into a warning, so both hooks end the command themselves.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pipeline import schema
from pipeline.guard.errors import StageError, exit_with_error, one_line
from pipeline.guard.interrupts import on_interrupt
from pipeline.sweeps import job as sweep
from pipeline.tracking import metrics, runs, store

log = logging.getLogger(__name__)


def _job_label(run, swept: list[str]) -> str:
    """'job 3 (model=uni model.lr=1e6)': the number and the job's values of the swept keys."""
    overrides = json.loads(run.data.tags.get("hydra_overrides", "[]"))
    shown = " ".join(o for o in overrides if sweep.override_key(o) in swept)
    return f"job {run.data.tags.get(sweep.JOB_TAG, '?')} ({shown})"


def launched_jobs(sweep_dir: Path) -> dict[int, str]:
    """Job number -> its overrides, from the job folders Hydra made (<sweep dir>/<n>/.hydra/):
    finds jobs that died before recording anything. Empty if the folder is elsewhere (a
    remote launcher without a shared filesystem)."""
    jobs = {}
    for hydra_yaml in sweep_dir.glob("*/.hydra/hydra.yaml"):
        try:
            hydra = OmegaConf.load(hydra_yaml).hydra
            jobs[int(hydra.job.num)] = " ".join(str(o) for o in hydra.overrides.task)
        except Exception:  # a job folder half-written by a killed job: not ours to judge
            continue
    return jobs


class SweepCallback(Callback):
    """Holds only strings and numbers: launchers pickle the callbacks to their workers."""

    def __init__(self) -> None:
        self.sweep_id: str | None = None
        self.parent_run_id: str | None = None
        self.job_started: float | None = None

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        self.job_started = time.monotonic()

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        """However the job ended: ``job_seconds`` on its run (the sweep's parallel speed-up is
        its wall time over the sum of these) and 'sweep <id>: k of N jobs done'."""
        job = sweep.current_job()
        if job is None or self.job_started is None:
            return
        try:
            client = store.connect(config.tracking)
            run = job.find_run(client)
            if run is not None:
                metrics.log_metrics(client, run.info.run_id,
                                    {"job_seconds": time.monotonic() - self.job_started})
            sweep.log_progress(client, job.sweep_id)
        except Exception as exc:  # the store may be gone: the job's own outcome matters
            log.warning("sweep %s, job %d: could not record its timing: %s", job.sweep_id,
                        job.num, one_line(exc))

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        try:
            schema.validate(OmegaConf.create({"tracking": config.tracking}))
            client = store.connect(config.tracking)
            self.sweep_id = sweep.sweep_id(config.hydra.sweep.dir)
            sweep.check_new_sweep(client, self.sweep_id, config.hydra.sweep.dir)
            experiment = store.experiment_id(client, config.tracking.experiment_name)
            choices = config.hydra.runtime.choices
            defining = sweep.sweep_overrides(config.hydra)  # an Optuna search space, too
            tags = {**runs.source_tags(), sweep.SWEEP_TAG: self.sweep_id,
                    sweep.ROLE_TAG: "parent", "stage": "train sweep",
                    "sweep_dir": str(Path(config.hydra.sweep.dir).resolve()),
                    "sweep_overrides": " ".join(config.hydra.overrides.task),
                    sweep.SWEPT_TAG: json.dumps(sweep.swept_keys(defining)),
                    sweep.TOTAL_TAG: str(sweep.planned_jobs(config.hydra) or "?"),
                    **sweep.search_tags(config.hydra),
                    "launcher": str(choices.get("hydra/launcher")),
                    "preset": str(choices.get("experiment"))}
            tags[runs.NOTE_TAG] = (   # the parent run's description
                f"Sweep `{self.sweep_id}`: `python -m pipeline.stages.train -m "
                f"{' '.join(config.hydra.overrides.task)}`, {tags[sweep.TOTAL_TAG]} jobs, each "
                "a training run folded under this one. Its report, once they are done: "
                f"`python -m pipeline.commands.sweep_report sweep={self.sweep_id}`.")
            run = client.create_run(experiment, run_name=f"sweep {self.sweep_id}", tags=tags)
            self.parent_run_id = run.info.run_id
        except Exception as exc:
            exit_with_error(exc)
        on_interrupt(lambda reason: self._stopped(client, reason))
        log.info("sweep %s: parent run %s in experiment %r", self.sweep_id, self.parent_run_id,
                 config.tracking.experiment_name)

    def _stopped(self, client, reason: BaseException) -> str | None:
        """The sweep was stopped before its end hook. Ctrl-C, SIGTERM, SIGHUP: the parent and
        every job run still RUNNING end KILLED (a worker may be stopped before it can mark its
        own run). A worker process died (the launcher then stops every job): the runs of the
        jobs that were running end KILLED, the parent FAILED, and the returned line names
        those jobs."""
        running = sorted((run for run in runs.search_runs(client, sweep.jobs_filter(self.sweep_id))
                          if run.info.status == "RUNNING"),
                         key=lambda run: int(run.data.tags.get(sweep.JOB_TAG, -1)))
        if isinstance(reason, KeyboardInterrupt):
            runs.end_killed(client, self.parent_run_id, str(reason) or "interrupted")
            for run in running:
                runs.end_killed(client, run.info.run_id, str(reason) or "interrupted")
            return None
        exit_codes = re.search(r"exit codes? of the workers? (?:are|is) \{?([^}]*)", str(reason))
        cause = f"exit code {exit_codes.group(1)}" if exit_codes else one_line(reason)[:300]
        for run in running:
            runs.end_killed(client, run.info.run_id,
                            f"the worker process of this sweep died ({cause}); sweep stopped")
        swept = json.loads(client.get_run(self.parent_run_id).data.tags.get(sweep.SWEPT_TAG, "[]"))
        jobs = ", ".join(_job_label(run, swept) for run in running) or "no job with a run"
        line = (f"sweep {self.sweep_id}: a worker process died ({cause}) and the launcher "
                f"stopped the sweep; jobs running then: {jobs} (runs KILLED; parent run "
                f"{self.parent_run_id} FAILED)")
        runs.end_failed(client, self.parent_run_id, line)
        return line

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        try:
            summary, failed = self._finish(config)
        except Exception as exc:
            exit_with_error(exc)
        if failed:
            exit_with_error(StageError(summary))
        print(summary, flush=True)

    def _finish(self, config: DictConfig) -> tuple[str, bool]:
        client = store.connect(config.tracking)
        job_runs = runs.search_runs(client, sweep.jobs_filter(self.sweep_id))
        by_status: dict[str, list] = {}
        for run in job_runs:
            by_status.setdefault(run.info.status, []).append(run)
        recorded = {int(run.data.tags.get(sweep.JOB_TAG, -1)) for run in job_runs}
        unrecorded = {num: overrides for num, overrides
                      in launched_jobs(Path(config.hydra.sweep.dir)).items()
                      if num not in recorded}
        finished = by_status.get("FINISHED", [])
        not_finished = [run for status, group in by_status.items() if status != "FINISHED"
                        for run in group]
        jobs = len(job_runs) + len(unrecorded)

        parent = client.get_run(self.parent_run_id)
        wall = time.time() - parent.info.start_time / 1000
        job_seconds = sum(run.data.metrics.get("job_seconds", 0.0) for run in job_runs)
        # Four metrics: with the report's six at most (pipeline.sweeps.page), the parent run
        # shows ten charts, not fifty; the jobs' own times are in the report's runs.csv.
        values = {"sweep_seconds": wall, "jobs": jobs, "jobs_failed": jobs - len(finished)}
        if job_seconds > 0:
            values["parallel_ratio"] = wall / job_seconds  # 1: serial; 1/n_jobs: ideal
        metrics.log_metrics(client, self.parent_run_id, values)

        timing = (f"{wall:.0f} s wall, the jobs' own times sum to {job_seconds:.0f} s"
                  + (f" (ratio {wall / job_seconds:.2f})" if job_seconds > 0 else ""))
        if not not_finished and not unrecorded:
            client.set_terminated(self.parent_run_id, "FINISHED")
            return (f"sweep {self.sweep_id}: {jobs} jobs finished, {timing}; parent run "
                    f"{self.parent_run_id}; report: "
                    f"{sweep.report_command([self.sweep_id])}"), False
        swept = json.loads(parent.data.tags.get(sweep.SWEPT_TAG, "[]"))
        problems = [f"{_job_label(run, swept)} {run.info.status}: "
                    f"{run.data.tags.get(runs.ERROR_TAG, 'no error recorded')}"
                    for run in sorted(not_finished,
                                      key=lambda r: int(r.data.tags.get(sweep.JOB_TAG, -1)))]
        problems += [f"job {num} ({overrides}) left no run in MLflow (see its log in "
                     f"{Path(config.hydra.sweep.dir) / str(num)})"
                     for num, overrides in sorted(unrecorded.items())]
        summary = (f"sweep {self.sweep_id}: {jobs - len(finished)} of {jobs} jobs failed: "
                   + "; ".join(problems) + f" ({len(finished)} finished, {timing}; parent "
                   f"run {self.parent_run_id})")
        runs.end_failed(client, self.parent_run_id, summary)
        return summary, True
