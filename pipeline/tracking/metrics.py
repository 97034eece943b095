"""Sending metrics: in batches (one request for many values), so that 1,000 checkpoint values
cost one write instead of a thousand; and never at the cost of the training that makes them."""

from __future__ import annotations

import logging
import time
from typing import Mapping

from pipeline.tracking.store import StoreUnavailable, describe_failure

log = logging.getLogger(__name__)

BATCH_LIMIT = 1000  # metrics per log_batch request: MLflow's limit


class MetricBuffer:
    """Collects metric values and sends them to a run in batches.

    One ``log_metric`` call is one write (one HTTP request, or one SQLite transaction): 1,000 of
    them (200 checkpoints x 5 metrics) cost seconds. Batching sends everything in a few
    requests; flushing at most every ``flush_every_seconds`` keeps the UI's curves live.

    A flush that fails (the store stopped answering) raises nothing: the values are kept and
    sent with a later flush, tried again at most every ``retry_every_seconds``; once the store
    counts as gone (:class:`StoreUnavailable`, after the client's outage budget) nothing more
    is tried. How long a failing call can block is bounded by the client
    (pipeline.tracking.store.StoreClient).
    """

    def __init__(self, client, run_id: str, flush_every_seconds: float,
                 retry_every_seconds: float = 5.0):
        self.client = client
        self.run_id = run_id
        self.flush_every_seconds = flush_every_seconds
        self.retry_every_seconds = retry_every_seconds
        self.pending: list = []
        self.last_flush = time.monotonic()
        self.seconds_spent = 0.0  # time spent sending: measured, logged as a tag
        self.values_sent = 0
        self.error: str | None = None  # the last failure, while values are unsent
        self.gave_up = False

    def add(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        self.pending.extend(Metric(key, float(value), now_ms, step)
                            for key, value in values.items())
        wait = self.retry_every_seconds if self.error else self.flush_every_seconds
        if time.monotonic() - self.last_flush >= wait:
            self.flush()

    def flush(self) -> bool:
        """Send what is pending; True when nothing is left unsent. Never raises."""
        started = time.monotonic()
        try:
            while self.pending and not self.gave_up:
                batch = self.pending[:BATCH_LIMIT]
                self.client.log_batch(self.run_id, metrics=batch)
                del self.pending[:len(batch)]
                self.values_sent += len(batch)
            if self.error is not None and not self.pending:
                log.warning("tracking store answers again: the kept metric values are sent")
                self.error = None
        except Exception as exc:  # the store: training goes on, the values wait
            first = self.error is None
            self.gave_up = isinstance(exc, StoreUnavailable)
            self.error = (str(exc) if self.gave_up else f"tracking store "
                          f"{self.client.tracking_uri}: {describe_failure(exc)}")
            if first or self.gave_up:
                log.warning("could not send %d metric values (%s); %s", len(self.pending),
                            self.error, "training goes on, nothing more is sent" if
                            self.gave_up else "kept, training goes on")
        finally:
            self.last_flush = time.monotonic()
            self.seconds_spent += self.last_flush - started
        return not self.pending

    def finish(self) -> None:
        """The last flush: raises :class:`StoreUnavailable` if values remain unsent."""
        if not self.flush():
            raise StoreUnavailable(f"{len(self.pending)} metric values were not sent "
                                   f"({self.error})")


def log_metrics(client, run_id: str, values: Mapping[str, float], step: int = 0) -> None:
    """Several metrics at one step, in one request."""
    from mlflow.entities import Metric

    now_ms = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, float(value), now_ms, step)
                                      for key, value in values.items()])
