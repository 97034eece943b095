"""The MLflow tracking store: which one (URI), checking it answers before any work starts, and
the client every stage uses (:class:`StoreClient`): it rides out SQLite's "database is locked"
and bounds how long a store that stopped answering can hold a stage (docs/architecture.md, "Tracking" and "Failure handling").
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import random
import re
import time
from pathlib import Path
from typing import Iterator

from omegaconf import DictConfig

from pipeline.guard import interrupts
from pipeline.guard.errors import StageError
from pipeline.paths import tracking_root
from pipeline.tracking import stale_runs

log = logging.getLogger(__name__)


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


# SQLite's words for a fault of the machine (not of the code) and what a user does about it.
# "readonly" is also what SQLite says when the file was deleted or moved while open.
SQLITE_FAULTS = (
    ("attempt to write a readonly database", "the tracking store is read-only",
     "make the file and its folder writable, or set tracking.uri to another store"),
    ("database or disk is full", "the tracking store's disk is full",
     "free space on that filesystem, or set tracking.uri to a store on another disk"),
)


def sqlite_fault(uri: str, exc: BaseException) -> str | None:
    """'<database file>: <what>: <fix>' for a SQLite store's machine fault, else None. (The
    raw error names no file: a user with several stores cannot tell which one failed.)"""
    if not str(uri).startswith("sqlite:///"):
        return None
    database = Path(str(uri)[len("sqlite:///"):].split("?")[0])
    for words, what, fix in SQLITE_FAULTS:
        if words in str(exc):
            if not database.exists():
                what = "the tracking store was deleted or moved while in use"
                fix = "put it back, or rerun the stage to start a new store there"
            return f"{database}: {what} ({words}): {fix}"
    return None


class StoreUnavailable(StageError):
    """The store has not answered for the whole outage budget: nothing more is sent to it."""


def describe_failure(exc: BaseException) -> str:
    """What went wrong in a call to the store, short: MLflow's HTTP errors nest the URL, the
    retry state and the socket error; the socket error is what a user can act on."""
    text = " ".join(str(exc).split())
    for pattern, said in ((r"Connection refused", "connection refused"),
                          (r"[Rr]ead timed out|timeout exception", "no answer (timed out)"),
                          (r"Name or service not known|nodename nor servname|"
                           r"Temporary failure in name resolution", "unknown host"),
                          (r"Connection reset|RemoteDisconnected|Connection aborted",
                           "connection dropped")):
        if re.search(pattern, text):
            return said
    return text[:200] or type(exc).__name__


class StoreClient:
    """The ``MlflowClient`` of a stage. Every call:

    - is retried when the store says "database is locked": at most ``attempts`` tries, waiting
      ``first_wait`` seconds, doubling up to ``max_wait``, each wait jittered by +-50% so that
      two waiting processes do not collide again in step;
    - against an HTTP store, uses MLflow's HTTP client with ``request_timeout`` seconds per
      attempt and one retry (MLflow's defaults: 120 s and 7 retries with growing waits, about
      8 minutes for one call to a server that went away); once calls have been failing for
      ``outage_budget`` seconds in a row (a success resets the count), the store counts as
      gone and every later call raises :class:`StoreUnavailable` at once.

    Any other error, or the last lock error, is raised as it is. Attributes that are not
    methods (``tracking_uri``) are passed through.
    """

    def __init__(self, client, attempts: int = 8, first_wait: float = 0.2,
                 max_wait: float = 5.0, sleep=time.sleep, request_timeout: int = 10,
                 outage_budget: float = 30.0, clock=time.monotonic):
        self._client = client
        self._attempts, self._first_wait, self._max_wait = attempts, first_wait, max_wait
        self._sleep, self._clock = sleep, clock
        self._request_timeout, self._outage_budget = request_timeout, outage_budget
        self._failing_for = 0.0  # seconds spent in calls that failed since the last success
        self._last_error = ""

    @property
    def gone(self) -> bool:
        return self._failing_for >= self._outage_budget

    def __getattr__(self, name: str):
        value = getattr(self._client, name)
        if not callable(value):
            return value

        @functools.wraps(value)
        def call(*args, **kwargs):
            if self.gone:
                raise StoreUnavailable(
                    f"tracking store {self._client.tracking_uri} stopped answering "
                    f"({self._last_error}, for {self._failing_for:.0f} s)")
            started = self._clock()
            try:
                with interrupts.deferred(), self._http_limits():
                    result = self._retrying_locks(name, value, args, kwargs)
            except Exception as exc:
                self._failing_for += self._clock() - started
                self._last_error = describe_failure(exc)
                if self.gone:
                    log.warning("tracking store %s: no answer for %.0f s, giving up on it: %s",
                                self._client.tracking_uri, self._failing_for,
                                self._last_error)
                fault = sqlite_fault(self._client.tracking_uri, exc)
                if fault is None:
                    raise
                # Still an MlflowException: the callers' handlers (a run completed later, a
                # metric buffer that waits) treat it as any store error.
                from mlflow.exceptions import MlflowException
                raise MlflowException(fault) from None
            self._failing_for = 0.0
            return result

        return call

    def _http_limits(self):
        uri = str(self._client.tracking_uri)
        if not uri.startswith(("http://", "https://")):
            return contextlib.nullcontext()
        # Never wait past the budget: the per-attempt timeout shrinks as it is used up.
        left = self._outage_budget - self._failing_for
        timeout = max(1, min(self._request_timeout, int(left / 2)))
        return _env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1",
                    MLFLOW_HTTP_REQUEST_TIMEOUT=str(timeout))

    def _retrying_locks(self, name: str, method, args, kwargs):
        for attempt in range(1, self._attempts + 1):
            try:
                return method(*args, **kwargs)
            except Exception as exc:
                if attempt == self._attempts or not is_lock_error(exc):
                    raise
                wait = min(self._max_wait, self._first_wait * 2 ** (attempt - 1))
                wait *= 0.5 + random.random()
                log.warning("MLflow store busy (database is locked) in %s; retry %d/%d "
                            "in %.1f s", name, attempt, self._attempts - 1, wait)
                self._sleep(wait)


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


def connect(tracking: DictConfig, close_stale: bool = True) -> StoreClient:
    """Return the :class:`StoreClient` of the configured store after checking it answers, and
    (``close_stale``) end the runs that dead processes of this host left RUNNING
    (pipeline.tracking.stale_runs).

    Raises StageError (one line, naming the URI, which holds no credentials:
    pipeline.guard.credentials) if it does not
    answer within about ``tracking.probe_timeout_seconds``.
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
    request_timeout = max(timeout, 10)
    if uri.startswith(("http://", "https://")):
        # The same limits for what goes past the client (MLflow's fluent API, which logs the
        # model), unless set by the user.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(request_timeout))
    wrapped = StoreClient(client, request_timeout=request_timeout)
    if close_stale:
        stale_runs.close_stale_runs(wrapped)
    return wrapped


# The kind MLflow 3's UI reads to open an experiment on its runs, not its GenAI pages (3.17
# decides by a switch kept in the browser instead: the link `make ui` prints sets it).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
EXPERIMENT_DESCRIPTION = """\
**Seeing traces and tokens?** Switch the toggle at the top left from **GenAI** to **Model
training** (this browser remembers it): the training runs are there.

Table 19-12 of the book, reproduced: a unidirectional (`uni`) and a bidirectional (`bi`)
vanilla RNN, numpy from scratch, classifying 28 x 28 images read row by row: MNIST digits,
as the book, and Fashion-MNIST clothes (the `dataset` param).

- Each training is a run named `<model>-<dataset>-seed<n>` (`bi-mnist-seed0`); its page
  says what was trained and how it scored. The DVC pipeline's report of a dataset is the run
  `table-19-12-<dataset>`, whose description is the table itself.
- To compare: tick `uni-mnist-seed0` and `bi-mnist-seed0` and press **Compare** (parameter
  counts side by side, validation curves overlaid). In the runs table, **Columns** adds
  `param_count` and `test_acc_best` (MLflow shows no metric or param column until asked).
- Test accuracy: `test_acc_best` (parameters of the lowest validation loss) and
  `test_acc_last` (after the final update). Each run logs its model under the run's name;
  single runs register it as `birnn-<dataset>-uni` / `birnn-<dataset>-bi` (Model registry:
  each version's description and tags hold its test results).
- A sweep is a parent run `sweep <id>` with its jobs folded under it.
"""


def experiment_id(client, name: str) -> str:
    """The id of experiment ``name``, created if needed (tolerating a concurrent creator),
    with the model-training kind and, unless it has one, a description (its
    ``mlflow.note.content``)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(
                name, artifact_location=_artifact_location(client),
                tags={**EXPERIMENT_KIND, "mlflow.note.content": EXPERIMENT_DESCRIPTION})
        except MlflowException:
            experiment = client.get_experiment_by_name(name)  # another stage created it meanwhile
            if experiment is None:
                raise
    if not set(EXPERIMENT_KIND.items()) <= set(experiment.tags.items()):  # made by older code
        for key, value in EXPERIMENT_KIND.items():
            client.set_experiment_tag(experiment.experiment_id, key, value)
        if "mlflow.note.content" not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, "mlflow.note.content",
                                      EXPERIMENT_DESCRIPTION)
    return experiment.experiment_id
