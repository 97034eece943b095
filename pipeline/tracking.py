"""MLflow tracking for the stages: where the store is, checking it is reachable, runs, metrics.

Store. ``tracking.uri`` if set, else $MLFLOW_TRACKING_URI, else ``sqlite:///<root>/mlflow.db``
with an absolute path (see :func:`pipeline.paths.tracking_root`), so every stage, from any
working directory or DVC experiment copy, writes to the same database.

Reachability. :func:`connect` asks the store for one experiment with HTTP retries switched off
and a short timeout before any work starts: MLflow's own defaults retry for minutes, so an
unreachable server would otherwise look like a hang. The defaults are restored afterwards so
that a long training run still rides out a brief server hiccup.

Parallel writers. Several processes (a sweep's parallel jobs) may write to one SQLite file.
MLflow gives every session a 20 s busy timeout, so a writer waits while another commits:
measured here, four processes making 300 writes each into one file lost nothing and saw no
error. A lock error is still possible when a wait outlasts that (a long read by the UI, a slow
or network disk), and SQLite answers "database is locked" at once when it sees two
transactions deadlock, each upgrading from reading to writing; a server backed by SQLite passes
the same text on. :func:`connect` therefore returns a client whose calls retry on that error,
a bounded number of times with growing, jittered waits (:class:`LockRetryingClient`); a
retried write is safe because the failed transaction was rolled back whole (and MLflow drops
a metric value it already holds). WAL journaling would not remove the deadlock case and would
permanently change the user's database file, so the journal mode is left alone. The first use
of a fresh SQLite file (MLflow's schema migrations) is serialised across processes by a lock
file beside it (:func:`_first_contact_lock`), whoever starts them (a sweep, `dvc queue start
-j 2`, stages run by hand); a sweep also creates the experiment and its parent run once in its
start hook, before any job runs: see :mod:`pipeline.sweep_callback`.

Grouping. A single training run is a top-level run named after its model (``uni``, ``bi``).
The compare stage creates a report run and makes the runs it compared its children (the
``mlflow.parentRunId`` tag, which is how the UI nests runs): the UI then shows the report run
with the uni and bi runs folded under it, and ticking those two and pressing "Compare" overlays
their curves (same metric names, step = global iteration) and lists their parameters side by
side. A training run that is compared again moves under the newest report run; every report
run also keeps the ids it compared in its ``compared_run_ids`` tag.

Sweeps (``python -m pipeline.train -m ...``) are grouped both ways, for the UI and for
queries: one parent run per sweep (run name ``sweep <id>``, tag ``sweep_role=parent``),
created before any job starts, and every job's run nested under it (``mlflow.parentRunId``)
and tagged ``sweep_id=<id>``, ``sweep_role=job``, ``sweep_job=<job number>``. The sweep id
comes from Hydra's sweep directory (``multirun/2026-11-28/12-34-56`` gives
``2026-11-28_12-34-56``), which every job of one sweep shares: a job finds its parent by the
tag, so jobs running on other machines (submitit, Ray) against the same server join it too.
The tag is what the multi-seed report searches (``python -m pipeline.compare sweep=<id>``);
the parent holds the sweep's timing and, once compared, its report. See :mod:`pipeline.sweep`.

Metrics are buffered and sent with ``log_batch`` (one request per batch instead of one per
value): see :class:`MetricBuffer`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from omegaconf import DictConfig, OmegaConf

from pipeline.cli import StageError
from pipeline.paths import PROJECT_ROOT, tracking_root

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"  # the UI nests a run under the run named here
COMPARED_TAG = "compared_run_ids"
ERROR_TAG = "error"
CODE_AND_CONFIG = ("birnn", "pipeline", "conf", "dvc.yaml", "params.yaml")


def default_uri() -> str:
    return f"sqlite:///{tracking_root() / 'mlflow.db'}"


def tracking_uri(tracking: DictConfig) -> str:
    if tracking.uri:
        return str(tracking.uri)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return default_uri()


def _artifact_location(client) -> str | None:
    """Artifacts of the default store go to <root>/mlartifacts/. (MLflow's default is ./mlruns
    under whatever directory the experiment happened to be created from.) A server decides
    its own artifact location."""
    if client.tracking_uri == default_uri():
        return (tracking_root() / "mlartifacts").as_uri()
    return None


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def is_lock_error(exc: BaseException) -> bool:
    """SQLite's "database is locked" (or "database table is locked"), however it was wrapped:
    MLflow's store raises it inside an MlflowException; a server on SQLite sends its text."""
    text = str(exc).lower()
    return "database is locked" in text or "database table is locked" in text


class _DropLockTracebacks(logging.Filter):
    """MLflow logs a full traceback for every OperationalError before raising it; for a lock
    that we are about to retry, that is noise (the retry itself is logged in one line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not is_lock_error(Exception(record.getMessage()))


class LockRetryingClient:
    """An ``MlflowClient`` whose every call is retried when the store says "database is
    locked": at most ``attempts`` tries, waiting ``first_wait`` seconds, doubling up to
    ``max_wait``, each wait jittered by +-50% so that two waiting processes do not collide
    again in step. Any other error, or the last lock error, is raised as it is.
    Attributes that are not methods (``tracking_uri``) are passed through.
    """

    def __init__(self, client, attempts: int = 8, first_wait: float = 0.2,
                 max_wait: float = 5.0, sleep=time.sleep):
        self._client = client
        self._attempts, self._first_wait, self._max_wait = attempts, first_wait, max_wait
        self._sleep = sleep

    def __getattr__(self, name: str):
        value = getattr(self._client, name)
        if not callable(value):
            return value

        @functools.wraps(value)
        def call(*args, **kwargs):
            for attempt in range(1, self._attempts + 1):
                try:
                    return value(*args, **kwargs)
                except Exception as exc:
                    if attempt == self._attempts or not is_lock_error(exc):
                        raise
                    wait = min(self._max_wait, self._first_wait * 2 ** (attempt - 1))
                    wait *= 0.5 + random.random()
                    log.warning("MLflow store busy (database is locked) in %s; retry %d/%d "
                                "in %.1f s", name, attempt, self._attempts - 1, wait)
                    self._sleep(wait)

        return call


@contextlib.contextmanager
def _first_contact_lock(uri: str) -> Iterator[None]:
    """Serialise the first contact with a SQLite store across processes.

    Opening a fresh SQLite file runs MLflow's schema migrations; two processes doing it at
    once make one fail ('duplicate column name: step'), e.g. `dvc queue start -j 2` or
    parallel stages on a clone with no mlflow.db yet. An OS lock file beside the database
    makes the second process wait the second or two the first one's migration takes.
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    database = Path(uri[len("sqlite:///"):])
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)   # released when the file closes
        yield


def connect(tracking: DictConfig):
    """Return an ``MlflowClient`` for the configured store after checking it answers,
    wrapped to retry on SQLite lock errors (:class:`LockRetryingClient`).

    Raises StageError (one line, naming the URI) if it does not answer within about
    ``tracking.probe_timeout_seconds``.
    """
    from mlflow.tracking import MlflowClient

    # A fresh SQLite store announces its schema migration at INFO level on stderr; keep
    # stderr for errors.
    for name in ("mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    db_log = logging.getLogger("mlflow.store.db.utils")
    if not any(isinstance(f, _DropLockTracebacks) for f in db_log.filters):
        db_log.addFilter(_DropLockTracebacks())
    uri = tracking_uri(tracking)
    timeout = int(tracking.probe_timeout_seconds)
    started = time.monotonic()
    try:
        with _env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(timeout)), \
                _first_contact_lock(uri):
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)
    except Exception as exc:  # any failure here means: cannot use this store
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise StageError(f"tracking store {uri} is not usable "
                         f"(after {time.monotonic() - started:.1f} s): {reason}") from None
    log.info("tracking store: %s", uri)
    return LockRetryingClient(client)


def experiment_id(client, name: str) -> str:
    """The id of experiment ``name``, created if needed (tolerating a concurrent creator)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(client))
    except MlflowException:
        experiment = client.get_experiment_by_name(name)  # another stage created it meanwhile
        if experiment is None:
            raise
        return experiment.experiment_id


def source_tags(script: str | os.PathLike | None = None) -> dict[str, str]:
    """What the UI shows as the run's source: the stage module, the code's git commit and
    whether code or configuration differ from it (``git_dirty``; files the pipeline itself
    rewrites, such as dvc.lock and metrics/, do not count). The client API, unlike
    mlflow.start_run, sets none of these by itself.

    ``script`` is the stage's file; by default the script that was started, which is right
    for a single run but not for a sweep job that a launcher runs in a worker process (whose
    sys.argv[0] is the launcher's own entry point)."""
    script = Path(script if script is not None else sys.argv[0]).resolve()
    source = script.relative_to(PROJECT_ROOT) if script.is_relative_to(PROJECT_ROOT) else script
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": str(source)}

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()

    try:
        tags["mlflow.source.git.commit"] = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--", *CODE_AND_CONFIG)
        tags["git_dirty"] = str(bool(changed)).lower()
    except (OSError, subprocess.SubprocessError):
        pass  # not a git checkout (an exported tarball, say): no commit to record
    return tags


def flatten(config: Mapping[str, Any] | DictConfig, prefix: str = "") -> dict[str, str]:
    """{'model': {'lr': 0.01}} -> {'model.lr': '0.01'}: the resolved config as MLflow params."""
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, prefix=f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(value)
        else:
            flat[name] = "{}" if isinstance(value, Mapping) else str(value)
    return flat


class MetricBuffer:
    """Collects metric values and sends them to a run in batches.

    One ``log_metric`` call is one write (one HTTP request, or one SQLite transaction): 1,000 of
    them (200 checkpoints x 5 metrics) cost seconds. Batching sends everything in a few
    requests; flushing at most every ``flush_every_seconds`` keeps the UI's curves live.
    """

    def __init__(self, client, run_id: str, flush_every_seconds: float):
        self.client = client
        self.run_id = run_id
        self.flush_every_seconds = flush_every_seconds
        self.pending: list = []
        self.last_flush = time.monotonic()
        self.seconds_spent = 0.0  # time spent sending: measured, logged as a tag
        self.values_sent = 0

    def add(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        self.pending.extend(Metric(key, float(value), now_ms, step)
                            for key, value in values.items())
        if time.monotonic() - self.last_flush >= self.flush_every_seconds:
            self.flush()

    def flush(self) -> None:
        started = time.monotonic()
        if self.pending:
            self.client.log_batch(self.run_id, metrics=self.pending)
            self.values_sent += len(self.pending)
            self.pending = []
        self.last_flush = time.monotonic()
        self.seconds_spent += self.last_flush - started


def log_metrics(client, run_id: str, values: Mapping[str, float], step: int = 0) -> None:
    """Several metrics at one step, in one request."""
    from mlflow.entities import Metric

    now_ms = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, float(value), now_ms, step)
                                      for key, value in values.items()])


def log_params(client, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    client.log_batch(run_id, params=[Param(key, str(value)) for key, value in params.items()])


@contextlib.contextmanager
def run(client, experiment: str, run_name: str, tags: Mapping[str, str],
        script: str | os.PathLike | None = None) -> Iterator[str]:
    """Create a run in experiment ``experiment`` (a name; created if needed) and yield its id;
    end it FINISHED, or FAILED with the error as a tag. KeyboardInterrupt ends it KILLED.
    The error is re-raised for the stage to report. ``script``: see :func:`source_tags`.
    """
    created = client.create_run(experiment_id(client, experiment), run_name=run_name,
                                tags={**source_tags(script), **tags})
    run_id = created.info.run_id
    log.info("MLflow run %s (%s) in experiment %r", run_id, run_name, experiment)
    try:
        yield run_id
    except KeyboardInterrupt:
        end_killed(client, run_id)
        raise
    except BaseException as exc:
        end_failed(client, run_id, " ".join(str(exc).split()) or type(exc).__name__)
        raise
    client.set_terminated(run_id, "FINISHED")


def end_failed(client, run_id: str, error: str) -> None:
    """Mark a run FAILED with ``error`` in its ``error`` tag."""
    _end(client, run_id, "FAILED", error)


def end_killed(client, run_id: str) -> None:
    """Mark a run KILLED (Ctrl-C), as :func:`run` does for its own runs."""
    _end(client, run_id, "KILLED", "interrupted")


def _end(client, run_id: str, status: str, error: str) -> None:
    try:
        client.set_tag(run_id, ERROR_TAG, error[:5000])
        client.set_terminated(run_id, status)
    except Exception as exc:  # the store may be what failed; the original error matters more
        log.warning("could not mark run %s %s: %s", run_id, status, exc)


def read_run_info(model_dir: Path) -> dict:
    """models/<name>/run.json, written by the train stage: which run holds this model."""
    from pipeline.io import read_json

    return read_json(model_dir / "run.json",
                     hint=f"train this model first (python -m pipeline.train model={model_dir.name})")


def require_run(client, run_id: str, where: str):
    """The run ``run_id`` (named in file ``where``) from the store, or a one-line StageError."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        raise StageError(f"{where}: run {run_id} is not in tracking store "
                         f"{client.tracking_uri} (was it trained with another tracking.uri?)") \
            from None


def adopt_children(client, parent_run_id: str, child_run_ids: list[str]) -> None:
    """Nest runs under ``parent_run_id`` in the UI (see the module docstring)."""
    for child in child_run_ids:
        client.set_tag(child, PARENT_TAG, parent_run_id)
    client.set_tag(parent_run_id, COMPARED_TAG, ",".join(child_run_ids))


def search_runs(client, filter_string: str, experiment_ids: list[str] | None = None) -> list:
    """Every run matching ``filter_string`` in the given experiments (default: all active
    ones), following MLflow's pages (one page holds at most 1,000 runs)."""
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if not experiment_ids:
        return []
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string,
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs
