"""A real ``mlflow server`` for fault tests: SQLite store and artifacts in a temporary folder,
127.0.0.1 on a free port, its own process group, which can be stopped (SIGKILL), frozen
(SIGSTOP: it accepts connections and never answers), resumed and started again on the same
port and store. Every process it started is killed when the context ends."""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from pipeline_testkit import VENV_BIN, clean_env, free_port


@dataclass
class Server:
    folder: Path
    port: int
    process: subprocess.Popen | None = None
    groups: list[int] = field(default_factory=list)  # every process group started

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def database(self) -> Path:
        return self.folder / "mlflow.db"

    @property
    def artifacts(self) -> Path:
        return self.folder / "artifacts"

    def start(self, timeout: float = 90) -> None:
        log = open(self.folder / "server.log", "ab")
        self.process = subprocess.Popen(
            [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri",
             f"sqlite:///{self.database}", "--artifacts-destination", str(self.artifacts),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            cwd=self.folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env=clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
        log.close()
        self.groups.append(self.process.pid)
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("mlflow server did not start: "
                                   + (self.folder / "server.log").read_text()[-2000:])
            time.sleep(0.3)

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        """The server goes away at once (connections are refused from now on)."""
        _signal_group(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _group_alive(self.process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)

    def freeze(self) -> None:
        _signal_group(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        _signal_group(self.process.pid, signal.SIGCONT)

    def stop_all(self) -> None:
        for group in self.groups:
            _signal_group(group, signal.SIGCONT)
            _signal_group(group, signal.SIGKILL)
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=30)


def _signal_group(group: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signum)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


@contextlib.contextmanager
def mlflow_server(folder: Path) -> Iterator[Server]:
    folder.mkdir(parents=True, exist_ok=True)
    server = Server(folder, free_port())
    try:
        server.start()
        yield server
    finally:
        server.stop_all()


@contextlib.contextmanager
def basic_auth_proxy(upstream: Server, user: str, password: str
                     ) -> Iterator["http.server.ThreadingHTTPServer"]:
    """A reverse proxy in front of ``upstream`` on a free port that answers 401 to any request
    without HTTP basic auth ``user``:``password`` (MLflow's own basic-auth app needs Flask-WTF,
    which the project does not install). Yields the proxy: ``url`` to give the stages,
    ``refused`` the paths of the requests it refused (no header is kept)."""
    import base64
    import http.client
    import threading

    expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            if self.headers.get("Authorization") != expected:
                refused.append(self.path)
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in ("authorization", "host", "connection")}
            connection = http.client.HTTPConnection("127.0.0.1", upstream.port, timeout=60)
            try:
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
            finally:
                connection.close()
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

    refused: list[str] = []
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    proxy.refused = refused  # type: ignore[attr-defined]
    proxy.url = f"http://127.0.0.1:{proxy.server_address[1]}"  # type: ignore[attr-defined]
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()
