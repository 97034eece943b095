"""A throwaway MLflow tracking server backed by a throwaway PostgreSQL, both on 127.0.0.1.

    python scripts/local_tracking_server.py [--port 5000]

starts PostgreSQL (a fresh cluster in a temporary folder, on a free loopback port, its socket
in that folder) and ``mlflow server`` against it, prints the tracking URI, and serves until
Ctrl-C; then it stops both and deletes the folder. Use it to try ``tracking=server`` on one
machine; a real shared server is set up as in the README ("A shared tracking server"). The
tests use :func:`tracking_server` from here (tests/test_server.py).

PostgreSQL refuses to run as root: run as root, this starts it as the ``postgres`` user
(created by Debian's postgresql package). Its binaries are looked up in $PG_BIN, then
``pg_config --bindir``, then /usr/lib/postgresql/<newest>/bin.

The server runs with MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false: MLflow 3's server otherwise
starts a job runner with seven worker processes (~0.5 GB, for GenAI jobs this project does not
use) and leaves a temporary folder in /dev/shm.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

HOST = "127.0.0.1"  # loopback only, always
PG_TOOLS = ("initdb", "postgres")
DB_USER = DB_NAME = "mlflow"


class ServerError(RuntimeError):
    """Something could not be started; the message says what and where its log is."""


@dataclasses.dataclass
class TrackingServer:
    uri: str              # http://127.0.0.1:<port>: what tracking.uri / MLFLOW_TRACKING_URI take
    backend_uri: str      # postgresql+psycopg://mlflow@127.0.0.1:<port>/mlflow
    artifacts: Path       # the server's --artifacts-destination
    workdir: Path


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
            "env": {**os.environ, "HOME": entry.pw_dir, "USER": "postgres"}}


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


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


def _stop(proc: subprocess.Popen | None, sig: int, timeout: float = 20) -> None:
    """Send ``sig`` to the process group of ``proc``, then SIGKILL it if still there."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _postgres_ready(port: int) -> bool:
    import psycopg

    try:
        with psycopg.connect(host=HOST, port=port, user=DB_USER, dbname="postgres",
                             connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False


def _health(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def tracking_server(workdir: Path | None = None, port: int | None = None,
                    pg_bin: Path | None = None, start_timeout: float = 120
                    ) -> Iterator[TrackingServer]:
    """Start PostgreSQL and an MLflow server on it; stop both (and delete ``workdir`` if this
    created it) on exit, whatever happened. Raises ServerError if either does not start."""
    try:
        import psycopg  # the driver MLflow's SQLAlchemy store will use; also used below
    except ImportError:
        raise ServerError("the PostgreSQL driver is not installed: pip install -e '.[server]' "
                          "(psycopg[binary])") from None
    pg_bin = pg_bin or find_pg_bin()
    if pg_bin is None:
        raise ServerError("PostgreSQL server binaries (initdb, postgres) not found in $PG_BIN, "
                          "pg_config --bindir or /usr/lib/postgresql/*/bin: apt-get install "
                          "postgresql")
    created = workdir is None
    workdir = Path(workdir or tempfile.mkdtemp(prefix="birnn-tracking-", dir="/tmp"))
    postgres = mlflow = None
    try:
        drop = _as_postgres_user()
        pgdata = workdir / "pgdata"
        pgdata.mkdir(mode=0o700)
        if drop:
            os.chown(workdir, drop["user"], drop["group"])
            os.chown(pgdata, drop["user"], drop["group"])
        pg_log = workdir / "postgres.log"
        with open(pg_log, "w") as log:
            if drop:
                os.chown(pg_log, drop["user"], drop["group"])
            result = subprocess.run(
                [str(pg_bin / "initdb"), "-D", str(pgdata), "-U", DB_USER, "--auth=trust",
                 "-E", "UTF8", "--no-locale"], stdout=log, stderr=subprocess.STDOUT,
                timeout=120, **drop)
        if result.returncode != 0:
            raise ServerError(f"initdb failed (log {pg_log}): {_tail(pg_log)}")
        pg_port = free_port()
        # Loopback only (-h), socket in the work folder (-k), no durability needed (fsync off).
        postgres = subprocess.Popen(
            [str(pg_bin / "postgres"), "-D", str(pgdata), "-h", HOST, "-p", str(pg_port),
             "-k", str(workdir), "-c", "fsync=off", "-c", "full_page_writes=off"],
            stdout=open(pg_log, "a"), stderr=subprocess.STDOUT, start_new_session=True, **drop)
        _wait(lambda: _postgres_ready(pg_port), postgres, "PostgreSQL", pg_log, 60)
        with psycopg.connect(host=HOST, port=pg_port, user=DB_USER, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DB_NAME}")

        backend_uri = f"postgresql+psycopg://{DB_USER}@{HOST}:{pg_port}/{DB_NAME}"
        artifacts = workdir / "artifacts"
        artifacts.mkdir()
        port = port or free_port()
        url = f"http://{HOST}:{port}"
        mlflow_log = workdir / "mlflow-server.log"
        mlflow_cli = Path(sys.executable).with_name("mlflow")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        mlflow = subprocess.Popen(
            [str(mlflow_cli), "server", "--backend-store-uri", backend_uri,
             "--artifacts-destination", str(artifacts), "--host", HOST, "--port", str(port),
             "--workers", "1"],
            cwd=workdir, env=env, stdout=open(mlflow_log, "w"), stderr=subprocess.STDOUT,
            start_new_session=True)
        _wait(lambda: _health(url), mlflow, "mlflow server", mlflow_log, start_timeout)
        yield TrackingServer(uri=url, backend_uri=backend_uri, artifacts=artifacts,
                             workdir=workdir)
    finally:
        _stop(mlflow, signal.SIGTERM)
        _stop(postgres, signal.SIGINT)  # PostgreSQL's "fast" shutdown
        if created:
            shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=5000, help="the MLflow server's port")
    args = parser.parse_args()
    try:
        with tracking_server(port=args.port) as server:
            print(f"MLflow tracking server on PostgreSQL: {server.uri}\n"
                  f"  backend store: {server.backend_uri}\n"
                  f"  artifacts:     {server.artifacts}\n"
                  f"Use it with\n  export MLFLOW_TRACKING_URI={server.uri}\n"
                  f"  python -m pipeline.train tracking=server ...\n"
                  "Ctrl-C stops both servers and deletes their data.", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
                while True:
                    time.sleep(3600)
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
