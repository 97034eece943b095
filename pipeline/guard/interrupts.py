"""What runs when a command is stopped before it ends: Ctrl-C (SIGINT); SIGTERM and SIGHUP
(what ``timeout``, ``scancel``, SLURM's time limit and ``docker stop`` send, and a closed
terminal); a sweep whose worker process died. The hooks mark the runs left behind (a sweep's
parent run, its jobs' runs), then the command prints one line and exits: 128 + the signal's
number (130, 143, 129), or 1 for a dead worker.

SIGTERM and SIGHUP raise :class:`Terminated`, a KeyboardInterrupt, wherever the main thread
is: every ``except KeyboardInterrupt`` that ends a run KILLED handles them as it does Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Callable, NoReturn

from pipeline.guard.errors import one_line

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
# The exceptions a launcher raises in the sweep's process when a job's worker process died
# (joblib/loky; concurrent.futures; submitit), named rather than imported: each comes from an
# optional package.
LOST_WORKER_ERRORS = ("TerminatedWorkerError", "BrokenProcessPool", "UncompletedJobError")

Hook = Callable[[BaseException], "str | None"]
_hooks: list[Hook] = []


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived."""

    def __init__(self, signum: int):
        super().__init__(f"terminated ({signal.Signals(signum).name})")
        self.signum = signum


_deferring = 0  # > 0 while a tracking-store call runs (see deferred())
_pending: int | None = None
_received: int | None = None  # the first stop signal: the command ends for it (raise_if_lost)
_stopping = False  # the hooks run: the command is ending


def _raise_for(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def _raise_terminated(signum: int, frame) -> None:
    global _pending, _received
    if _received is None:
        _received = signum
    # Already stopping (a KeyboardInterrupt is being handled: a run is being ended KILLED):
    # another signal (Ctrl-C twice) would cut that clean-up short. The first one's code stands.
    if _stopping or isinstance(sys.exc_info()[1], KeyboardInterrupt):
        return
    if _deferring:
        _pending = _received
        return
    _raise_for(_received)


def raise_if_lost() -> None:
    """Raise the stop signal received, if any, at a point where a run would end FINISHED or
    the command exit 0. Its KeyboardInterrupt may have been raised where Python drops
    exceptions (a finaliser or weakref callback, as SQLAlchemy's during MLflow's model
    logging: "Exception ignored in ...") or in code that catches BaseException."""
    if _received is not None:
        _raise_for(_received)


_unraisable_hook = sys.unraisablehook


def _quiet_unraisable(unraisable) -> None:  # a dropped stop signal: raise_if_lost reports it
    if not isinstance(unraisable.exc_value, KeyboardInterrupt):
        _unraisable_hook(unraisable)


@contextlib.contextmanager
def deferred():
    """Hold a stop signal until the block ends. A KeyboardInterrupt raised in the middle of a
    tracking-store call can leave a SQLite write transaction open, and ending the run KILLED
    would then wait on its lock; store calls are bounded, so the signal is only delayed."""
    global _deferring, _pending
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _pending is not None:
            signum, _pending = _pending, None
            _raise_for(signum)


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP raise :class:`Terminated` in the main thread. A signal the process
    was started ignoring (``nohup`` ignores SIGHUP) stays ignored."""
    global _received, _pending, _stopping, _unraisable_hook
    if threading.current_thread() is not threading.main_thread():
        return
    _received = _pending = None
    _stopping = False
    for signum in HANDLED_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _raise_terminated)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # Ctrl-C: deferrable too
        signal.signal(signal.SIGINT, _raise_terminated)
    if sys.unraisablehook is not _quiet_unraisable:
        _unraisable_hook, sys.unraisablehook = sys.unraisablehook, _quiet_unraisable


SWEEP_PROCESS_ENV = "BIRNN_SWEEP_PROCESS"  # the pid of the command that launches sweep jobs


def mark_sweep_process() -> None:
    """Before a stage's Hydra app: the processes it starts (a sweep's workers) know it."""
    os.environ[SWEEP_PROCESS_ENV] = str(os.getpid())


_watching = False
_orphaned = False


def exit_with_parent(poll_seconds: float = 0.5, grace_seconds: float = 20) -> None:
    """In a sweep job that runs in a worker process the command started itself (joblib's
    loky workers): when the command dies (``kill -9``), stop the job as SIGTERM would (its run
    ends KILLED; then :func:`exit_if_orphaned`), and end the worker after ``grace_seconds``
    regardless. Loky does neither: the worker trains on, then waits forever for its next job,
    holding the command's terminal or pipe, and with it loky's resource trackers. Anywhere
    else (a single run; a Slurm, Ray or submitit job, whose parent is not the command) it does
    nothing."""
    global _watching
    try:
        parent = int(os.environ.get(SWEEP_PROCESS_ENV, ""))
    except ValueError:
        return
    if _watching or parent == os.getpid() or os.getppid() != parent:
        return
    _watching = True
    install_signal_handlers()

    def watch() -> None:
        global _orphaned
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        _orphaned = True
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_seconds)
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def exit_if_orphaned() -> None:
    """Once a stopped job has ended its run: exit now if the command that ran it is gone."""
    if _orphaned:
        os._exit(128 + signal.SIGTERM)


def in_slurm_job() -> bool:
    """Whether this process is a sweep job that submitit runs on Slurm (hydra/launcher=slurm)."""
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "SLURM_JOB_ID" in os.environ


def install_slurm_job_handlers() -> None:
    """In a Slurm job, replace the handlers submitit installed before the task: it only logs
    SIGTERM (what ``scancel`` and the time limit send, SIGKILL following after the cluster's
    KillWait), and answers its time-limit warning (SIGUSR2, sbatch ``--signal=USR2@<
    signal_delay_s>``) by requeuing or failing the job, which this project never requeues.
    Here SIGTERM and SIGHUP raise :class:`Terminated` once (Slurm may deliver SIGTERM twice, to
    the step and through srun; the second would interrupt the clean-up), and the warning is
    noted in the job's log while the job runs on to its limit."""
    if threading.current_thread() is not threading.main_thread():
        return

    def terminate_once(signum: int, frame) -> None:
        for handled in HANDLED_SIGNALS:
            signal.signal(handled, signal.SIG_IGN)
        _raise_terminated(signum, frame)

    for signum in HANDLED_SIGNALS:
        signal.signal(signum, terminate_once)
    warning = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))
    signal.signal(warning, _note_time_limit_warning)


def _note_time_limit_warning(signum: int, frame) -> None:
    # os.write, not print: a handler that prints while the main thread is printing fails with
    # "reentrant call" in the middle of the training.
    os.write(2, f"warning: {signal.Signals(signum).name} from Slurm: the time limit is near; "
                "the run ends KILLED when it is reached\n".encode())


def is_lost_worker(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) says a worker process died."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if any(cls.__name__ in LOST_WORKER_ERRORS for cls in type(exc).__mro__):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def describe(reason: BaseException) -> str:
    """'interrupted', 'terminated (SIGTERM)', or what the launcher said about a dead worker."""
    if isinstance(reason, KeyboardInterrupt):
        return str(reason) or "interrupted"
    return f"a worker process died: {one_line(reason)}"


def exit_code(reason: BaseException) -> int:
    if isinstance(reason, Terminated):
        return 128 + reason.signum
    if isinstance(reason, KeyboardInterrupt):
        return 128 + signal.SIGINT
    return 1


def on_interrupt(hook: Hook) -> None:
    """Run ``hook(reason)`` if the command is stopped; it may return the line to print."""
    _hooks.append(hook)


def run_hooks_and_exit(reason: BaseException) -> NoReturn:
    global _stopping
    _stopping = True  # from here on, a stop signal is ignored: the hooks end the runs
    lines = []
    for hook in _hooks:
        try:
            line = hook(reason)
        except KeyboardInterrupt:  # stopped again while cleaning up: stop cleaning up
            break
        except Exception:  # the store is gone, say: exit regardless
            continue
        if line:
            lines.append(line)
    print(f"error: {lines[0] if lines else describe(reason)}", file=sys.stderr, flush=True)
    sys.exit(exit_code(reason))
