"""Helpers for the pipeline tests: running stages as subprocesses, copying the project.

Commands run in the working directory the test session set (tests/conftest.py: a temporary
folder), so Hydra's outputs/ and MLflow's mlruns/ never land in the checkout.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

from pipeline.metric_names import CHECKPOINT_METRICS, TEST_METRICS  # noqa: F401  (re-exported)

ROOT = Path(__file__).resolve().parent.parent
RAW_MNIST = ROOT / "data" / "raw" / "mnist"
VENV_BIN = Path(sys.executable).parent
# One epoch on 1,000 samples, validated on 200 every half epoch: two checkpoints, seconds.
TINY = ("experiment=quick", "train.epochs=1", "train.train_limit=1000", "train.val_limit=200",
        "train.batch_size=100")


# The environment a user could have on another CPU: OpenBLAS's Sandybridge kernels (no FMA),
# numpy without its AVX2 and AVX-512 dispatch targets. Pinned numerics override it.
OTHER_CPU = {"OPENBLAS_CORETYPE": "Sandybridge",
             "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR"}


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a stage: this interpreter's bin first on PATH (dvc.yaml calls
    `python`), no tracking URI or DVC variables inherited from the caller."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "DVC_", "HYDRA_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def run(args: list[str], cwd: Path | None = None, timeout: float = 300, **env: str
        ) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=clean_env(**env), capture_output=True, text=True,
                          timeout=timeout)


STAGES = ("prepare", "train", "evaluate", "compare")


def stage(module: str, *overrides: str, cwd: Path | None = None, timeout: float = 300,
          **env: str) -> subprocess.CompletedProcess:
    """``python -m pipeline.stages.<stage> <overrides>`` (``module`` a stage's name), or
    ``python -m pipeline.<module>`` (``sweeps.report``), through the real entry point."""
    name = f"pipeline.stages.{module}" if module in STAGES else f"pipeline.{module}"
    return run([sys.executable, "-m", name, *overrides], cwd=cwd, timeout=timeout, **env)


def raw_copy(tmp_path: Path) -> Path:
    """A writable copy of the shipped MNIST files and their manifest, to damage."""
    copy = tmp_path / "raw"
    shutil.copytree(RAW_MNIST, copy)
    for path in copy.iterdir():
        path.chmod(0o644)
    return copy


def prepare_into(raw: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """The prepare stage on the raw files in ``raw`` (verified by their own manifest) into
    ``out``."""
    return stage("prepare", f"data.raw_dir={raw}", f"data.manifest={raw / 'SHA256SUMS'}",
                 f"paths.prepared_dir={out}", *extra, timeout=120)


def dvc(project: Path, *args: str, timeout: float = 600) -> str:
    """``dvc <args>`` in ``project``; fails the test (showing DVC's output) unless it succeeds."""
    result = run(["dvc", *args], cwd=project, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(url: str, body: dict | None = None, timeout: float = 10) -> tuple[int, bytes]:
    """GET ``url``, or POST ``body`` as JSON; (status, body). An HTTP error raises."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, response.read()


def _terminate_group(process: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM the process group ``process`` leads, SIGKILL it if it lingers."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)


@contextlib.contextmanager
def http_service(args: list[str], ready_url: str, log: Path, timeout: float,
                 cwd: Path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """Run ``args`` (`mlflow ui`, `mlflow models serve`) in its own process group, its output
    in ``log``; yield once ``ready_url`` answers 200 (failing the test if the process dies or
    ``timeout`` seconds pass first); stop the whole group afterwards."""
    started = time.monotonic()
    with open(log, "wb") as out:   # the process keeps its own copy of the descriptor
        process = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        while True:
            try:
                if http(ready_url, timeout=2)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() - started < timeout, f"{ready_url} not up in {timeout} s: {log}"
            time.sleep(0.25)
        print(f"{Path(args[0]).name} {args[1]}: ready after {time.monotonic() - started:.1f} s")
        yield process
    finally:
        _terminate_group(process)


@contextlib.contextmanager
def model_server(uri: str, tracking_uri: str, folder: Path, timeout: float = 120
                 ) -> Iterator[str]:
    """`mlflow models serve -m <uri> --env-manager local` on a free loopback port, against
    ``tracking_uri``; yields the server's base URL. (It execs `uvicorn`: clean_env puts the
    virtualenv's bin first on PATH, as `source .venv/bin/activate` would.)"""
    port = free_port()
    env = clean_env(MLFLOW_TRACKING_URI=tracking_uri, TMPDIR=str(folder))
    with http_service([str(VENV_BIN / "mlflow"), "models", "serve", "-m", uri, "--env-manager",
                       "local", "--host", "127.0.0.1", "--port", str(port)],
                      f"http://127.0.0.1:{port}/ping", folder / "serve.log", timeout,
                      cwd=folder, env=env):
        yield f"http://127.0.0.1:{port}"


def copy_project(dest: Path) -> Path:
    """Copy the project's source files as they are in the working tree (tracked and untracked
    but not ignored: no .venv, no mlflow.db, no outputs) into ``dest`` and make it a git
    repository with one commit, as DVC and the git-commit tag need."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    made_by_setup = [".dvc/plots/offline.html"]  # (ignored by git: scripts/offline_plots.py)
    for name in [*filter(None, listing), *made_by_setup]:
        source = ROOT / name
        if source.is_file():  # (deleted but still in the index: skip)
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True, capture_output=True)
    commit_all(dest, "copy for tests")
    return dest


def commit_all(project: Path, message: str) -> None:
    git = ["git", "-c", "user.name=pipeline tests", "-c", "user.email=tests@localhost"]
    for args in (["add", "-A"], ["commit", "-q", "--allow-empty", "-m", message]):
        subprocess.run([*git, *args], cwd=project, check=True, capture_output=True)


def sweep_store(tmp: Path, prepared: Path) -> dict:
    """A SQLite tracking store and a reports folder under ``tmp`` for sweeps (whose jobs write
    their models and metrics under their own folders): ``paths`` are the overrides that point
    a stage at them, ``client`` reads the store."""
    from mlflow.tracking import MlflowClient

    db = f"sqlite:///{tmp / 'mlflow.db'}"
    return {"tmp": tmp, "db": db, "client": MlflowClient(db),
            "paths": (f"tracking.uri={db}", f"paths.prepared_dir={prepared}",
                      f"paths.reports_dir={tmp / 'reports'}")}


def run_sweep(store: dict, sweep_dir: Path, *overrides: str, timeout: float = 600, **env: str):
    """A joblib sweep (2 jobs at a time) into ``store``: (result, sweep id, sweep dir);
    ``env``: variables to set in its environment."""
    from pipeline.sweeps import job as sweep

    result = stage("train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                   f"hydra.sweep.dir={sweep_dir}", *store["paths"], *overrides, timeout=timeout,
                   **env)
    return result, sweep.sweep_id(str(sweep_dir)), sweep_dir
