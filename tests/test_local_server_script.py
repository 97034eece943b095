"""scripts/local_tracking_server.py is safe to leave running by mistake.

PostgreSQL asks every client for a password and MLflow's role is no superuser; no password
shows in output, argv, environments or logs; SIGINT, SIGTERM and SIGHUP, during start-up or
once ready, stop both servers and delete their folder; what a SIGKILLed instance left running
is stopped by the next start; a busy port, or another server answering on it, is never taken
for ours; waits are bounded. The script runs as a user runs it (a subprocess), its state files
in the test's tmp_path ($BIRNN_TRACKING_STATE_DIR), its ports from free_port(). Its server
folders are its own temporary folders (/tmp/birnn-tracking-*, which PostgreSQL, run as user
postgres, can reach); every test checks they are gone.
"""

from __future__ import annotations

import contextlib
import http.server
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "local_tracking_server.py"
spec = importlib.util.spec_from_file_location("local_tracking_server_script", SCRIPT)
server_script = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(server_script)
free_port = server_script.free_port  # the same helper as pipeline_testkit.free_port
HOST = "127.0.0.1"
READY = "MLflow tracking server on PostgreSQL: "

needs_postgres = pytest.mark.skipif(
    server_script.find_pg_bin() is None,
    reason="PostgreSQL server binaries (initdb, postgres) not installed: "
           "apt-get install postgresql (.ci/run does), or set PG_BIN")


# --- Processes, seen through /proc ---------------------------------------------------------

def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # state, ppid, pgrp, ...; [19]: start time


def start_time(pid: int) -> int:
    return int(_stat(pid)[19])


def alive(pid: int, started: int | None = None) -> bool:
    fields = _stat(pid)
    return (fields is not None and fields[0] != "Z"
            and (started is None or int(fields[19]) == started))


def family(pid: int) -> dict[int, int]:
    """``pid`` and all its descendants, each with its start time (a pid alone may be reused)."""
    children: dict[int, list[int]] = {}
    started: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        fields = _stat(int(entry.name)) if entry.name.isdigit() else None
        if fields:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
            started[int(entry.name)] = int(fields[19])
    found, todo = {}, [pid]
    while todo:
        current = todo.pop()
        if current in started:
            found[current] = started[current]
            todo += children.get(current, [])
    return found


def processes_mentioning(*texts: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            with contextlib.suppress(OSError):
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                if alive(int(entry.name)) and any(text in f" {command} " for text in texts):
                    found.append(int(entry.name))
    return found


def wait_until(predicate, timeout: float, what: str, script: Script | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if script is not None and script.proc.poll() is not None:
            pytest.fail(f"the script exited ({script.proc.returncode}) before {what}: "
                        f"{script.stderr()[-2000:]}")
        time.sleep(0.05)
    pytest.fail(f"not within {timeout} s: {what}")


# --- The script as a user runs it ----------------------------------------------------------

class Script:
    """``python scripts/local_tracking_server.py --port <port>``, its output in files."""

    def __init__(self, folder: Path, port: int, name: str):
        self.port = port
        self.state_dir = folder / "state"
        self.out, self.err = folder / f"{name}.out", folder / f"{name}.err"
        self.workdirs: set[str] = set()  # every server folder it was seen to use
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PG"))}
        env["BIRNN_TRACKING_STATE_DIR"] = str(self.state_dir)  # the folder of state files
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, str(SCRIPT), "--port", str(port)],
                                         stdout=out, stderr=err, env=env, cwd=folder)

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr().splitlines() if line.strip()]

    def ready(self) -> bool:
        return READY in self.stdout()

    def state(self) -> dict:
        """Its state file (empty before it writes one)."""
        for path in self.state_dir.glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                state = json.loads(path.read_text())
                if state.get("owner_pid") == self.proc.pid:
                    self.workdirs.add(state["workdir"])
                    return state
        return {}

    def wait(self, timeout: float = 120) -> int:
        return self.proc.wait(timeout=timeout)

    def clean_up(self) -> None:
        """After the test, whatever happened: stop the script, then anything left of its
        servers, and delete their folders."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.workdirs:
            for pid in processes_mentioning(*self.workdirs, f" --port {self.port} "):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        for workdir in self.workdirs:
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def start_script(tmp_path):
    started: list[Script] = []

    def start(port: int) -> Script:
        started.append(Script(tmp_path, port, f"run{len(started)}"))
        return started[-1]

    yield start
    for script in started:
        script.clean_up()


def assert_nothing_left(processes: dict[int, int], script: Script, workdir: str) -> None:
    """No process of the servers left (by pid and start time, and by folder or port on a
    command line), their folder deleted, no state file left."""
    left = [pid for pid, started in processes.items() if alive(pid, started)]
    assert left == [], [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in left]
    assert processes_mentioning(workdir, f" --port {script.port} ") == []
    assert not Path(workdir).exists()
    assert list(script.state_dir.glob("*.json")) == []


def passwords(workdir: Path) -> list[str]:
    """The passwords in a server folder (the superuser's, and mlflow's once it exists)."""
    found = [(workdir / "superuser-password").read_text().strip()]
    if (workdir / "pgpass").exists():  # host:port:database:user:password
        found.append((workdir / "pgpass").read_text().strip().rsplit(":", 1)[1])
    return found


@contextlib.contextmanager
def foreign_server(port: int):
    """Another HTTP server on ``port`` that answers 200 to anything, /health included."""

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer((HOST, port), Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


# --- PostgreSQL's authentication -----------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with server_script.tracking_server(state_dir=tmp_path_factory.mktemp("state")) as running:
        yield running


def _pg_port(server) -> int:
    return urllib.parse.urlsplit(server.backend_uri).port


@needs_postgres
def test_postgres_asks_everyone_for_a_password_and_mlflow_is_no_superuser(server, tmp_path):
    import psycopg
    from mlflow.tracking import MlflowClient

    for secret in (server.password_file, server.workdir / "superuser-password"):
        assert secret.stat().st_mode & 0o777 == 0o600, secret
        assert secret.parent == server.workdir
    hba = [line.split() for line in (server.workdir / "pgdata" / "pg_hba.conf").read_text()
           .splitlines() if line.strip() and not line.startswith("#")]
    assert ["local", "all", "all", "scram-sha-256"] in hba
    assert ["host", "all", "all", "127.0.0.1/32", "scram-sha-256"] in hba
    assert all(line[-1] == "scram-sha-256" for line in hba), hba  # no trust, no peer

    # Without the password no one gets in: not mlflow, not the superuser, not over the socket.
    no_passfile = str(tmp_path / "no-pgpass")
    for user in ("mlflow", "postgres"):
        for host in (HOST, str(server.workdir)):
            with pytest.raises(psycopg.OperationalError, match="password"):
                psycopg.connect(host=host, port=_pg_port(server), user=user, dbname="postgres",
                                passfile=no_passfile, connect_timeout=10).close()

    backend = server.backend_uri.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(backend, connect_timeout=10) as conn:
        role = conn.execute("SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, "
                            "rolbypassrls FROM pg_roles WHERE rolname = current_user"
                            ).fetchone()
        owner = conn.execute("SELECT pg_get_userbyid(datdba) FROM pg_database "
                             "WHERE datname = current_database()").fetchone()[0]
    assert role == (False, False, False, False, False)
    assert owner == "mlflow"

    # ... and the MLflow server stores through that password file.
    client = MlflowClient(tracking_uri=server.uri)
    experiment_id = client.create_experiment("authenticated")
    assert client.get_experiment(experiment_id).name == "authenticated"


@needs_postgres
def test_no_password_on_a_command_line_in_an_environment_or_a_log(server):
    secrets = [p.encode() for p in passwords(server.workdir)]
    assert len(secrets) == 2 and all(len(p) >= 32 for p in secrets)
    assert not any(p.decode() in server.backend_uri for p in secrets)
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            for name in ("cmdline", "environ"):
                with contextlib.suppress(OSError):
                    text = (proc / name).read_bytes()
                    assert not any(p in text for p in secrets), (proc, name)
    for log in ("postgres.log", "mlflow-server.log"):
        text = (server.workdir / log).read_bytes()
        assert not any(p in text for p in secrets), log


# --- Ready only when its own server answers; bounded waits ---------------------------------

@needs_postgres
def test_another_server_answering_on_the_port_is_not_taken_for_ours(tmp_path):
    port, state_dir = free_port(), tmp_path / "state"
    with foreign_server(port):
        with pytest.raises(server_script.ServerError, match="mlflow server exited") as error:
            with server_script.tracking_server(port=port, state_dir=state_dir):
                pytest.fail("ready, although the server answering is not ours")
    assert "address already in use" in str(error.value)
    workdir = str(error.value).split("(log ")[1].split("/mlflow-server.log")[0]
    assert not Path(workdir).exists() and processes_mentioning(workdir) == []
    assert list(state_dir.glob("*.json")) == []


@needs_postgres
def test_a_server_not_ready_in_time_fails_in_one_line_and_leaves_nothing(tmp_path):
    state_dir = tmp_path / "state"
    with pytest.raises(server_script.ServerError,
                       match="mlflow server did not become ready within 1 s") as error:
        with server_script.tracking_server(start_timeout=1, state_dir=state_dir):
            pytest.fail("ready within 1 s?")
    assert "\n" not in str(error.value)
    workdir = str(error.value).split("(log ")[1].split("/mlflow-server.log")[0]
    assert not Path(workdir).exists() and processes_mentioning(workdir) == []
    assert list(state_dir.glob("*.json")) == []


@needs_postgres
def test_a_busy_port_is_refused_in_one_line_without_saying_ready(start_script):
    port = free_port()
    with foreign_server(port):  # answers /health, as an earlier server on the port would
        script = start_script(port)
        try:
            returncode = script.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running after 60 s; stdout: {script.stdout()[:500]}")
    assert returncode == 1
    assert script.stderr_lines() == [f"error: port {port} is in use"]
    assert not script.ready() and script.stdout() == ""
    assert list(script.state_dir.glob("*.json")) == []


# --- Signals -------------------------------------------------------------------------------

def _started_postgres(script: Script) -> bool:
    return "postgres_pid" in script.state()


def _started_mlflow(script: Script) -> bool:
    return "mlflow_pid" in script.state() and not script.ready()


PHASES = {  # when to send the signal
    "waiting for PostgreSQL": _started_postgres,
    "waiting for MLflow": _started_mlflow,
    "ready": Script.ready,
}


@needs_postgres
@pytest.mark.parametrize("sig, phase", [
    (signal.SIGTERM, "waiting for PostgreSQL"),
    (signal.SIGHUP, "waiting for PostgreSQL"),
    (signal.SIGTERM, "waiting for MLflow"),
    pytest.param(signal.SIGHUP, "waiting for MLflow", marks=pytest.mark.slow),  # as SIGTERM
    pytest.param(signal.SIGINT, "waiting for MLflow", marks=pytest.mark.slow),
    (signal.SIGTERM, "ready"),  # ~15 s each once ready
    pytest.param(signal.SIGHUP, "ready", marks=pytest.mark.slow),
    pytest.param(signal.SIGINT, "ready", marks=pytest.mark.slow),  # Ctrl-C: as SIGTERM
], ids=lambda value: value.name if isinstance(value, signal.Signals) else value)
def test_a_signal_stops_both_servers_and_deletes_their_folder(start_script, sig, phase):
    script = start_script(free_port())
    wait_until(lambda: PHASES[phase](script), 120, phase, script)
    processes = family(script.proc.pid)  # the script, postgres (and its children), mlflow...
    workdir = script.state()["workdir"]
    secrets = passwords(Path(workdir))
    script.proc.send_signal(sig)
    assert script.wait(timeout=90) == 128 + sig
    assert_nothing_left(processes, script, workdir)  # ... and later ones, by command line
    assert script.stderr_lines() == [
        f"stopped by {sig.name}: servers stopped, their data deleted"]
    if phase == "ready":
        assert f"export MLFLOW_TRACKING_URI=http://{HOST}:{script.port}" in script.stdout()
    assert not any(p in script.stdout() + script.stderr() for p in secrets)


# --- Orphans of a killed instance ----------------------------------------------------------

def _sleeper(*marks: str, child: str | None = None) -> subprocess.Popen:
    """A process in its own session whose command line carries ``marks`` (as a server's names
    its folder); with ``child``, it starts one more in its group (as mlflow starts uvicorn)."""
    code = "import time; time.sleep(600)"
    if child is not None:
        code = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
                f"{code!r}, *{child.split()!r}]); time.sleep(600)")
    process = subprocess.Popen([sys.executable, "-c", code, *marks], start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Until it has exec'd, its command line is this process's: the script, which identifies
    # a server by its command line, would see "nothing running" (a CI failure once).
    cmdline = Path(f"/proc/{process.pid}/cmdline")
    deadline = time.monotonic() + 10
    while marks and marks[-1].encode() not in cmdline.read_bytes():
        assert time.monotonic() < deadline, f"{process.args} did not start"
        time.sleep(0.01)
    return process


def _state(state_dir: Path, name: str, owner: int, owner_started: int | None, **fields) -> Path:
    state_dir.mkdir(mode=0o700, exist_ok=True)
    path = state_dir / f"{name}.json"
    path.write_text(json.dumps({"owner_pid": owner, "owner_started": owner_started, **fields}))
    return path


def _dead_owner() -> int:
    finished = subprocess.Popen(["true"])
    finished.wait()
    return finished.pid


def test_what_a_killed_instance_left_running_is_stopped_and_its_folder_deleted(tmp_path,
                                                                              capsys):
    state_dir, workdir, port = tmp_path / "state", tmp_path / "birnn-tracking-killed", free_port()
    (workdir / "pgdata").mkdir(parents=True)
    postmaster = _sleeper("-D", str(workdir / "pgdata"))
    mlflow = _sleeper("--artifacts-destination", str(workdir / "artifacts"),
                      child=f"mlflow.server --port {port}")
    stranger = _sleeper("not-a-server")  # its pid recorded, but it is not ours (pid reused)
    running = _sleeper("-D", str(tmp_path / "running" / "pgdata"))  # of a live instance
    try:
        wait_until(lambda: len(family(mlflow.pid)) == 2, 30, "the fake uvicorn started")
        group = family(mlflow.pid)
        dead = _state(state_dir, "birnn-tracking-killed", _dead_owner(), 0,
                      workdir=str(workdir), remove_workdir=True,
                      pgdata=str(workdir / "pgdata"), postgres_pid=postmaster.pid,
                      postgres_started=start_time(postmaster.pid),
                      mlflow_pid=mlflow.pid, port=port)
        reused = _state(state_dir, "birnn-tracking-reused", _dead_owner(), 0,
                        workdir=str(tmp_path / "reused"), remove_workdir=False,
                        pgdata=str(tmp_path / "reused" / "pgdata"), postgres_pid=stranger.pid,
                        postgres_started=start_time(stranger.pid))
        live = _state(state_dir, "birnn-tracking-running", os.getpid(), start_time(os.getpid()),
                      workdir=str(tmp_path / "running"), remove_workdir=True,
                      pgdata=str(tmp_path / "running" / "pgdata"), postgres_pid=running.pid,
                      postgres_started=start_time(running.pid))

        server_script.stop_orphans(state_dir)

        assert postmaster.wait(timeout=5) is not None and mlflow.wait(timeout=5) is not None
        assert not any(alive(pid, started) for pid, started in group.items())
        assert not workdir.exists() and not dead.exists() and not reused.exists()
        assert stranger.poll() is None and running.poll() is None and live.exists()
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert lines == [(f"an earlier instance was killed without cleaning up: stopped "
                          f"PostgreSQL (pid {postmaster.pid}) and mlflow server "
                          f"(pid {mlflow.pid}), deleted {workdir}")]
    finally:
        for proc in (postmaster, mlflow, stranger, running):
            for pid in family(proc.pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()


def test_what_cannot_be_stopped_is_refused_in_one_line(tmp_path, monkeypatch):
    state_dir, workdir = tmp_path / "state", tmp_path / "birnn-tracking-stuck"
    postmaster = _sleeper("-D", str(workdir / "pgdata"))
    try:
        path = _state(state_dir, "birnn-tracking-stuck", _dead_owner(), 0,
                      workdir=str(workdir), remove_workdir=True, pgdata=str(workdir / "pgdata"),
                      postgres_pid=postmaster.pid,
                      postgres_started=start_time(postmaster.pid))
        workdir.mkdir()
        real_kill = os.kill

        def kill(pid, sig):  # as if it belonged to another user
            if pid == postmaster.pid:
                raise PermissionError(1, "Operation not permitted")
            real_kill(pid, sig)

        with monkeypatch.context() as patch, pytest.raises(server_script.ServerError) as error:
            patch.setattr(server_script.os, "kill", kill)  # os.kill itself, until the block ends
            patch.setattr(server_script, "STOP_TIMEOUT", 0.5)
            patch.setattr(server_script, "KILL_TIMEOUT", 0.5)
            server_script.stop_orphans(state_dir)
        assert str(error.value) == (
            f"PostgreSQL (pid {postmaster.pid}) left running by an earlier, killed instance "
            f"could not be stopped: stop them, then delete {path}")
        assert postmaster.poll() is None and path.exists() and workdir.exists()
    finally:
        postmaster.kill()
        postmaster.wait()


@needs_postgres
@pytest.mark.slow
def test_the_next_start_stops_what_a_killed_instance_left_running(start_script):
    port = free_port()
    first = start_script(port)
    wait_until(first.ready, 120, "the first instance is ready", first)
    state = first.state()
    processes = family(first.proc.pid)
    first.proc.kill()  # SIGKILL: no clean-up; its servers keep running, on the port
    first.proc.wait()
    assert alive(state["postgres_pid"]) and alive(state["mlflow_pid"])

    second = start_script(port)  # the same port: the orphan must be stopped first
    wait_until(second.ready, 120, "the second instance is ready", second)
    assert second.stderr_lines() == [(
        f"an earlier instance was killed without cleaning up: stopped PostgreSQL "
        f"(pid {state['postgres_pid']}) and mlflow server (pid {state['mlflow_pid']}), "
        f"deleted {state['workdir']}")]
    left = [pid for pid, started in processes.items()
            if pid != first.proc.pid and alive(pid, started)]
    assert left == [] and not Path(state["workdir"]).exists()
    assert second.state()["workdir"] != state["workdir"]

    workdir = second.state()["workdir"]
    second_processes = family(second.proc.pid)
    second.proc.send_signal(signal.SIGTERM)
    assert second.wait(timeout=90) == 128 + signal.SIGTERM
    assert_nothing_left(second_processes, second, workdir)
