"""A throwaway MLflow tracking server backed by a throwaway PostgreSQL, both on 127.0.0.1.

    python scripts/local_tracking_server.py [--port 5000]

starts PostgreSQL (a fresh cluster in a temporary folder, on a free loopback port, its socket
in that folder) and ``mlflow server`` against it, prints the tracking URI, and serves until
Ctrl-C, SIGTERM or SIGHUP; then it stops both, deletes the folder and exits with 128 + the
signal number. Use it to try ``tracking=server`` on one machine; a real shared server is set up
as in docs/tracking.md ("A shared tracking server"). The tests use :func:`tracking_server` from here
(tests/test_server.py, tests/test_local_server_script.py).

It is meant to be safe when left running by mistake:

- PostgreSQL asks for a password on every connection, TCP and Unix socket (scram-sha-256).
  The bootstrap superuser ``postgres`` and the ``mlflow`` role (not a superuser; it owns only
  its database) get random passwords, kept in 0600 files in the server's folder. No password
  is printed or put on a command line: the backend store URI names libpq's password file
  (``passfile=``) and reaches the MLflow server through MLFLOW_BACKEND_STORE_URI.
- Each instance records its processes in a state file in a private per-user folder
  ($XDG_RUNTIME_DIR/birnn-tracking-server, else /tmp/birnn-tracking-server-<uid>;
  $BIRNN_TRACKING_STATE_DIR overrides). A killed instance (SIGKILL) leaves its servers running:
  the next start stops them and deletes their folder.
- It says ready only when its own MLflow server answers (the socket listening on the port
  belongs to it), and every wait has a time limit.

PostgreSQL refuses to run as root: run as root, this starts it as the ``postgres`` user
(created by Debian's postgresql package). Its binaries are looked up in $PG_BIN, then
``pg_config --bindir``, then /usr/lib/postgresql/<newest>/bin. Linux only (it reads /proc).

The server runs with MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false: MLflow 3's server otherwise
starts a job runner with seven worker processes (~0.5 GB, for GenAI jobs this project does not
use) and leaves a temporary folder in /dev/shm.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator

HOST = "127.0.0.1"  # loopback only, always
PG_TOOLS = ("initdb", "postgres")
SUPERUSER = "postgres"
DB_USER = DB_NAME = "mlflow"
STATE_ENV = "BIRNN_TRACKING_STATE_DIR"
CAUGHT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STOP_TIMEOUT = 20  # seconds a server gets to stop when asked, before SIGKILL
KILL_TIMEOUT = 10  # seconds to wait after SIGKILL before giving up


class ServerError(RuntimeError):
    """Something could not be started; the message says what and where its log is."""


class Stopped(BaseException):
    """A caught signal (see main()); a BaseException so that no ``except Exception`` eats it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@dataclasses.dataclass
class TrackingServer:
    uri: str              # http://127.0.0.1:<port>: what tracking.uri / MLFLOW_TRACKING_URI take
    backend_uri: str      # postgresql+psycopg://mlflow@127.0.0.1:<port>/mlflow?passfile=<file>
    artifacts: Path       # the server's --artifacts-destination
    workdir: Path
    password_file: Path   # the mlflow role's password, in libpq's passfile format (mode 0600)


# --- Signals -------------------------------------------------------------------------------
# main() turns SIGINT, SIGTERM and SIGHUP into Stopped, so that the ``finally`` of
# tracking_server() stops what was started, whatever it was doing. A child that has just been
# started but not yet recorded would escape that clean-up: _signals_held() delays the signal
# until it is recorded. Used as a library (the tests), nothing is installed and these are no-ops.

_held = False
_pending: int | None = None
_stopping = False


def _on_signal(signum: int, _frame) -> None:
    global _pending, _stopping
    if _stopping:  # the clean-up is running: let it finish
        return
    _stopping = True
    if _held:
        _pending = signum
    else:
        raise Stopped(signum)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    global _held
    _held = True
    try:
        yield
    finally:
        _held = False
    if _pending is not None:
        raise Stopped(_pending)


# --- Processes (/proc) ---------------------------------------------------------------------

def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state, ppid, pgrp, ...)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def _started(pid: int) -> int | None:
    """Start time in clock ticks since boot: with the pid, it names one process for good."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def _alive(pid: int, started: int | None = None) -> bool:
    fields = _stat(pid)
    return (fields is not None and fields[0] != "Z"
            and (started is None or int(fields[19]) == started))


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def _processes(field: int, value: int) -> list[int]:
    """Live processes whose /proc stat ``field`` (1: ppid, 2: process group) is ``value``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields and fields[0] != "Z" and int(fields[field]) == value:
                found.append(int(entry.name))
    return found


def _listens(pgid: int, port: int) -> bool:
    """Whether a process of group ``pgid`` holds the socket listening on 127.0.0.1:<port>: then
    whoever answers there is our server, not one that had the port already."""
    address = f"{int.from_bytes(socket.inet_aton(HOST), sys.byteorder):08X}:{port:04X}"
    try:
        rows = [row.split() for row in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    except OSError:
        return False
    sockets = {f"socket:[{row[9]}]" for row in rows if row[1] == address and row[3] == "0A"}
    for pid in _processes(2, pgid):
        with contextlib.suppress(OSError):  # gone meanwhile
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in sockets:
                        return True
    return False


def _stop(proc: subprocess.Popen | None, sig: int) -> bool:
    """Send ``sig`` to the process group of ``proc``, then SIGKILL what is left of the group;
    whether ``proc`` is gone."""
    if proc is None:
        return True
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=STOP_TIMEOUT)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    try:
        proc.wait(timeout=KILL_TIMEOUT)
    except subprocess.TimeoutExpired:
        return False
    return True


def _terminate(pids: dict[int, int | None], postmaster: int | None) -> bool:
    """Stop processes that are not our children (SIGINT, PostgreSQL's fast shutdown, to the
    postmaster; SIGTERM to the others; then SIGKILL); whether all are gone."""
    for kill, grace in ((False, STOP_TIMEOUT), (True, KILL_TIMEOUT)):
        for pid, started in pids.items():
            if _alive(pid, started):
                sig = (signal.SIGKILL if kill else
                       signal.SIGINT if pid == postmaster else signal.SIGTERM)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not any(_alive(pid, started) for pid, started in pids.items()):
                return True
            time.sleep(0.2)
    return False


# --- State of running instances ------------------------------------------------------------

def state_folder() -> Path:
    if os.environ.get(STATE_ENV):
        return Path(os.environ[STATE_ENV])
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"], "birnn-tracking-server")
    return Path(f"/tmp/birnn-tracking-server-{os.getuid()}")


def _private(folder: Path) -> Path:
    """``folder``, created if needed; refused unless it is a directory only we can use (state
    files name processes to kill: in /tmp, another user could have planted them)."""
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700, parents=True)
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ServerError(f"{folder} is not a folder private to this user (mode 0700): "
                          f"remove it, or set ${STATE_ENV} to another folder")
    return folder


def _record(path: Path, state: dict) -> None:
    """Write the state file atomically, so a reader never sees half of it."""
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(state, indent=1))
    partial.replace(path)


def _orphans(state: dict) -> dict[int, int | None]:
    """The processes of a dead instance still running, each checked to be really its own (the
    same start time, a command line naming its folder or port): its postmaster with that one's
    children, and the MLflow server's process group (the mlflow command and its uvicorn)."""
    found: dict[int, int | None] = {}
    postmaster = state.get("postgres_pid")
    if (postmaster and _alive(postmaster, state.get("postgres_started"))
            and state["pgdata"] in _cmdline(postmaster)):
        found[postmaster] = state["postgres_started"]
        found.update((pid, _started(pid)) for pid in _processes(1, postmaster))
    if state.get("mlflow_pid"):
        for pid in _processes(2, state["mlflow_pid"]):
            command = f" {_cmdline(pid)} "
            if state["workdir"] in command or (
                    "mlflow.server" in command and f" --port {state['port']} " in command):
                found[pid] = _started(pid)
    return found


def stop_orphans(folder: Path | None = None) -> None:
    """Stop the servers of earlier instances that died without cleaning up (SIGKILL) and delete
    their folders, saying so in one line; raise ServerError if they cannot be stopped."""
    folder = _private(folder or state_folder())
    for path in sorted(folder.glob("*.json")):
        try:
            state = json.loads(path.read_text())
            owner_alive = _alive(state["owner_pid"], state["owner_started"])
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)  # not one of ours (we write them atomically)
            continue
        if owner_alive:  # a running instance: it cleans up after itself
            continue
        found = _orphans(state)
        servers = " and ".join(f"{name} (pid {state[key]})" for name, key in
                               (("PostgreSQL", "postgres_pid"), ("mlflow server", "mlflow_pid"))
                               if state.get(key) in found) or "their processes"
        if found and not _terminate(found, state.get("postgres_pid")):
            raise ServerError(f"{servers} left running by an earlier, killed instance could "
                              f"not be stopped: stop them, then delete {path}")
        workdir = Path(state["workdir"])
        removed = state.get("remove_workdir") and workdir.exists()
        if removed:
            shutil.rmtree(workdir, ignore_errors=True)
        path.unlink(missing_ok=True)
        if found or removed:
            _say(f"an earlier instance was killed without cleaning up: "
                 f"{f'stopped {servers}' if found else 'nothing was running'}"
                 f"{f', deleted {workdir}' if removed else ''}")


# --- Starting ------------------------------------------------------------------------------

def find_pg_bin() -> Path | None:
    """The folder holding initdb and postgres, or None if PostgreSQL is not installed."""
    candidates = []
    if os.environ.get("PG_BIN"):
        candidates.append(os.environ["PG_BIN"])
    if shutil.which("pg_config"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            candidates.append(subprocess.run(["pg_config", "--bindir"], capture_output=True,
                                             text=True, timeout=10, check=True).stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                         key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit()
                         else 0, reverse=True)
    for folder in candidates:
        if folder and all(os.access(Path(folder) / tool, os.X_OK) for tool in PG_TOOLS):
            return Path(folder)
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def check_port(port: int) -> None:
    """Raise ServerError unless ``port`` is free on 127.0.0.1."""
    with socket.socket() as sock:
        # As uvicorn does: connections of an earlier server in TIME_WAIT do not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ServerError(f"port {port} is in use") from None
            raise ServerError(f"port {port} cannot be used: {exc.strerror}") from None


def _as_postgres_user() -> dict:
    """Popen arguments that drop root to the postgres user (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return {}
    import pwd

    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        raise ServerError("running as root, and there is no 'postgres' user to run PostgreSQL "
                          "as (Debian's postgresql package creates it)") from None
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": [],
            "env": {**_without_pg_variables(os.environ), "HOME": entry.pw_dir,
                    "USER": "postgres"}}


def _without_pg_variables(env) -> dict:
    # A PGPASSWORD or PGHOST of the caller's would override the password file and the address.
    return {k: v for k, v in env.items() if not k.startswith("PG")}


def _secret_file(path: Path, text: str, owner: dict) -> Path:
    """Create ``path`` with mode 0600 from the start (never readable by others, even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)
    if owner:
        os.chown(path, owner["user"], owner["group"])
    return path


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def _start(args: list[str], log: Path, **popen) -> subprocess.Popen:
    """Start a child in its own session (so its group can be stopped as one, and a Ctrl-C in
    the terminal reaches only this script, which stops it in order). Call it with signals held
    until the child is recorded."""
    with open(log, "a") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, **popen)


def _wait(ready, proc: subprocess.Popen, what: str, log: Path, timeout: float) -> None:
    """Poll ``ready()`` until true; fail early if ``proc`` dies, or after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"{what} exited with status {proc.returncode} while starting "
                              f"(log {log}): {_tail(log)}")
        if ready():
            return
        time.sleep(0.2)
    raise ServerError(f"{what} did not become ready within {timeout:.0f} s (log {log}): "
                      f"{_tail(log)}")


def _postgres_ready(port: int, password: str) -> bool:
    import psycopg

    try:
        with psycopg.connect(host=HOST, port=port, user=SUPERUSER, password=password,
                             dbname="postgres", connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False


def _health(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _create_role_and_database(port: int, superuser_password: str, password: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(host=HOST, port=port, user=SUPERUSER, password=superuser_password,
                         dbname="postgres", autocommit=True, connect_timeout=10,
                         options="-c statement_timeout=60s") as conn:
        # Hashed here (as psql's \password does): the clear password never reaches the server,
        # so it cannot end up in its log.
        verifier = conn.pgconn.encrypt_password(password.encode(), DB_USER.encode(),
                                                b"scram-sha-256").decode()
        # The minimum: may log in, owns its database (and so its public schema); no superuser,
        # CREATEDB, CREATEROLE, REPLICATION or BYPASSRLS (the defaults, spelled out).
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE "
                             "NOREPLICATION NOBYPASSRLS PASSWORD {}").format(
                                 sql.Identifier(DB_USER), sql.Literal(verifier)))
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
            sql.Identifier(DB_NAME), sql.Identifier(DB_USER)))


@contextlib.contextmanager
def tracking_server(workdir: Path | None = None, port: int | None = None,
                    pg_bin: Path | None = None, start_timeout: float = 120,
                    state_dir: Path | None = None) -> Iterator[TrackingServer]:
    """Start PostgreSQL and an MLflow server on it; stop both (and delete ``workdir`` if this
    created it) on exit, whatever happened. First stops what killed instances left running
    (their state files are in ``state_dir``, default :func:`state_folder`). Raises ServerError
    if either does not start."""
    try:
        import psycopg  # noqa: F401  (the driver MLflow's SQLAlchemy store will use)
    except ImportError:
        raise ServerError("the PostgreSQL driver is not installed: pip install -e '.[server]' "
                          "(psycopg[binary])") from None
    pg_bin = pg_bin or find_pg_bin()
    if pg_bin is None:
        raise ServerError("PostgreSQL server binaries (initdb, postgres) not found in $PG_BIN, "
                          "pg_config --bindir or /usr/lib/postgresql/*/bin: apt-get install "
                          "postgresql")
    state_dir = state_dir or state_folder()
    stop_orphans(state_dir)
    created = workdir is None
    state_file = postgres = mlflow = None
    try:
        with _signals_held():  # the clean-up below must know the folder
            workdir = Path(workdir or tempfile.mkdtemp(prefix="birnn-tracking-", dir="/tmp"))
        pgdata = workdir / "pgdata"
        state_file = state_dir / f"{workdir.name}.json"
        state = {"owner_pid": os.getpid(), "owner_started": _started(os.getpid()),
                 "workdir": str(workdir), "remove_workdir": created, "pgdata": str(pgdata)}
        _record(state_file, state)

        drop = _as_postgres_user()
        pgdata.mkdir(mode=0o700)
        if drop:
            os.chown(workdir, drop["user"], drop["group"])
            os.chown(pgdata, drop["user"], drop["group"])
        pg_log = workdir / "postgres.log"
        pg_log.touch(mode=0o600)
        if drop:
            os.chown(pg_log, drop["user"], drop["group"])
        superuser_password = secrets.token_urlsafe(32)
        superuser_file = _secret_file(workdir / "superuser-password", superuser_password, drop)
        # scram-sha-256 for every pg_hba.conf line (Unix socket and 127.0.0.1): the cluster
        # never accepts a connection without a password, not even briefly after initdb.
        initdb = None
        try:
            with _signals_held():
                initdb = _start([str(pg_bin / "initdb"), "-D", str(pgdata), "-U", SUPERUSER,
                                 f"--pwfile={superuser_file}", "--auth=scram-sha-256",
                                 "-E", "UTF8", "--no-locale"], pg_log, **drop)
            initdb.wait(timeout=120)
        except subprocess.TimeoutExpired:
            raise ServerError(f"initdb did not finish within 120 s (log {pg_log})") from None
        finally:
            _stop(initdb, signal.SIGKILL)  # a no-op once it has exited
        if initdb.returncode != 0:
            raise ServerError(f"initdb failed (log {pg_log}): {_tail(pg_log)}")

        pg_port = free_port()
        # Loopback only (-h), socket in the work folder (-k), no durability needed (fsync off).
        with _signals_held():
            postgres = _start([str(pg_bin / "postgres"), "-D", str(pgdata), "-h", HOST,
                               "-p", str(pg_port), "-k", str(workdir), "-c", "fsync=off",
                               "-c", "full_page_writes=off"], pg_log, **drop)
            state.update(postgres_pid=postgres.pid, postgres_started=_started(postgres.pid),
                         postgres_port=pg_port)
            _record(state_file, state)
        _wait(lambda: _postgres_ready(pg_port, superuser_password), postgres, "PostgreSQL",
              pg_log, 60)
        password = secrets.token_urlsafe(32)
        password_file = _secret_file(workdir / "pgpass",
                                     f"{HOST}:{pg_port}:{DB_NAME}:{DB_USER}:{password}\n", {})
        _create_role_and_database(pg_port, superuser_password, password)

        # libpq reads the password from the file named here: the URI itself holds no secret.
        backend_uri = (f"postgresql+psycopg://{DB_USER}@{HOST}:{pg_port}/{DB_NAME}"
                       f"?passfile={urllib.parse.quote(str(password_file))}")
        artifacts = workdir / "artifacts"
        artifacts.mkdir()
        port = port or free_port()
        url = f"http://{HOST}:{port}"
        mlflow_log = workdir / "mlflow-server.log"
        mlflow_cli = Path(sys.executable).with_name("mlflow")
        env = {k: v for k, v in _without_pg_variables(os.environ).items()
               if not k.startswith("MLFLOW_")}
        env["MLFLOW_BACKEND_STORE_URI"] = backend_uri  # the environment, not argv (ps shows it)
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        with _signals_held():
            mlflow = _start([str(mlflow_cli), "server", "--artifacts-destination",
                             str(artifacts), "--host", HOST, "--port", str(port),
                             "--workers", "1"], mlflow_log, cwd=workdir, env=env)
            state.update(mlflow_pid=mlflow.pid, mlflow_started=_started(mlflow.pid), port=port)
            _record(state_file, state)
        # Ready when it answers and the answering socket is its own: another server already on
        # the port would answer too (ours then fails to bind and exits, which _wait reports).
        _wait(lambda: _health(url) and _listens(mlflow.pid, port), mlflow, "mlflow server",
              mlflow_log, start_timeout)
        yield TrackingServer(uri=url, backend_uri=backend_uri, artifacts=artifacts,
                             workdir=workdir, password_file=password_file)
    finally:
        stopped = _stop(mlflow, signal.SIGTERM)
        stopped = _stop(postgres, signal.SIGINT) and stopped  # SIGINT: PostgreSQL's "fast" shutdown
        if not stopped:  # keep the state file: the next start tries again
            _say(f"warning: could not stop the servers in {workdir}; the next start will retry")
        else:
            if created and workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
            if state_file is not None:
                state_file.unlink(missing_ok=True)


# --- Command line --------------------------------------------------------------------------

def _say(line: str) -> None:
    with contextlib.suppress(OSError):  # stderr may be gone with the terminal (SIGHUP)
        print(line, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=5000, help="the MLflow server's port")
    args = parser.parse_args()
    for sig in CAUGHT_SIGNALS:
        signal.signal(sig, _on_signal)
    try:
        stop_orphans()  # first: a server a killed instance left running may hold the port
        check_port(args.port)
        with tracking_server(port=args.port) as server:
            print(f"MLflow tracking server on PostgreSQL: {server.uri}\n"
                  f"  backend store: {server.backend_uri}\n"
                  f"  artifacts:     {server.artifacts}\n"
                  f"Use it with\n  export MLFLOW_TRACKING_URI={server.uri}\n"
                  f"  python -m pipeline.stages.train tracking=server ...\n"
                  "Ctrl-C stops both servers and deletes their data.", flush=True)
            while True:
                time.sleep(3600)
    except ServerError as exc:
        _say(f"error: {exc}")
        sys.exit(1)
    except Stopped as stop:
        _say(f"stopped by {signal.Signals(stop.signum).name}: servers stopped, their data "
             "deleted")
        sys.exit(128 + stop.signum)


if __name__ == "__main__":
    main()
