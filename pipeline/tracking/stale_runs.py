"""Runs left RUNNING by a process that died hard (``kill -9``, the out-of-memory killer, a lost
worker): found and ended KILLED.

Every run records the process that owns it (:func:`process_tags`: host, pid, and the process's
start time with the boot and pid namespace it belongs to, so that a reused pid or another
container with the same host name is not mistaken for it). :func:`close_stale_runs` ends the
RUNNING runs of this host whose process is gone; every stage does it when it connects to the
store, and a command does it on demand (pipeline.commands.close_stale_runs).

Runs of other hosts, and runs whose process cannot be judged from here, are never touched.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

log = logging.getLogger(__name__)

HOST_TAG = "host"
PID_TAG = "pid"
START_TAG = "process_start"  # '<boot id>/<pid namespace>/<start time in clock ticks>'
ERROR_TAG = "error"  # as pipeline.tracking.runs.ERROR_TAG


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _boot_and_namespace() -> tuple[str, str] | None:
    boot = _read("/proc/sys/kernel/random/boot_id")
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return (boot, namespace) if boot else None


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of process ``pid``, from /proc."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # after the command name, which may hold spaces
    return fields[0], fields[19]


def process_tags(pid: int | None = None) -> dict[str, str]:
    """The tags that name the process owning a run (this process by default)."""
    pid = os.getpid() if pid is None else pid
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(pid)}
    identity, stat = _boot_and_namespace(), _stat(pid)
    if identity is not None and stat is not None:
        tags[START_TAG] = f"{identity[0]}/{identity[1]}/{stat[1]}"
    return tags


def process_gone(tags: dict[str, str]) -> bool:
    """True only when the process named by a run's tags certainly no longer runs: same host,
    boot and pid namespace as this process, and no such pid, a zombie, or a pid now used by a
    process started at another time. Anything that cannot be judged counts as alive."""
    if tags.get(HOST_TAG) != socket.gethostname():
        return False
    try:
        pid = int(tags[PID_TAG])
        boot, namespace, started = tags[START_TAG].rsplit("/", 2)
    except (KeyError, ValueError):
        return False
    if _boot_and_namespace() != (boot, namespace) or pid <= 0:
        return False  # another machine or container with this name, or a reboot: not ours
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process: it exists
        pass
    stat = _stat(pid)
    if stat is None:  # hidden from us (/proc mounted with hidepid): cannot judge
        return False
    state, start = stat
    return state in ("Z", "X") or start != started


def find_stale_runs(client) -> list:
    """RUNNING runs of this host, in every active experiment, whose process is gone."""
    host = socket.gethostname()
    if "'" in host:
        return []
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    query = f"attributes.status = 'RUNNING' and tags.{HOST_TAG} = '{host}'"
    stale, token = [], None
    while True:
        page = client.search_runs(experiments, filter_string=query, max_results=1000,
                                  page_token=token)
        stale.extend(run for run in page if process_gone(run.data.tags))
        token = page.token
        if not token:
            return stale


def close(client, run) -> None:
    tags = run.data.tags
    client.set_tag(run.info.run_id, ERROR_TAG,
                   f"process {tags.get(PID_TAG)} on {tags.get(HOST_TAG)} ended without ending "
                   "this run (killed, or its worker died); closed by a later command")
    client.set_terminated(run.info.run_id, "KILLED")


def close_stale_runs(client) -> list[str]:
    """End KILLED every stale run of this host (:func:`find_stale_runs`); return their ids.
    Best effort: a failure is logged and skipped, never raised into a stage."""
    try:
        stale = find_stale_runs(client)
    except Exception as exc:
        log.warning("could not look for runs left RUNNING by dead processes: %s", exc)
        return []
    closed = []
    for run in stale:
        try:
            close(client, run)
        except Exception as exc:
            log.warning("could not end stale run %s: %s", run.info.run_id, exc)
            continue
        closed.append(run.info.run_id)
        log.warning("run %s (%s) was left RUNNING by process %s, which is gone: ended KILLED",
                    run.info.run_id, run.info.run_name, run.data.tags.get(PID_TAG))
    return closed
