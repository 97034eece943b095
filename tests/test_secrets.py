"""A password in a tracking URI never leaves the process (issue 7, class 2).

The end-to-end test trains through a real ``mlflow server`` with ``tracking.uri`` holding a
user and password, as a single run and as a parallel sweep, then searches every byte the
pipeline and the server wrote (the store, the artifacts, outputs/, models/, metrics/,
multirun/) and everything printed: the password appears nowhere, ``***`` where it was.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from mlflow_server import mlflow_server
from pipeline import errors, redaction
from pipeline.tracking import store
from pipeline_testkit import TINY, error_lines, free_port, stage


@pytest.mark.parametrize("text, expected", [
    ("http://user:pw@host:5000", "http://***@host:5000"),
    ("https://token@host/path", "https://***@host/path"),
    ("postgresql+psycopg://mlflow:pw@db:5432/mlflow", "postgresql+psycopg://***@db:5432/mlflow"),
    ("uri: http://u:p@ss@host/x", "uri: http://***@host/x"),  # an unencoded @ in the password
    # Hydra's log of a sweep's jobs escapes colons
    ("#0 : tracking.uri=http\\://u\\:p@h\\:5 x=1", "#0 : tracking.uri=http\\://***@h\\:5 x=1"),
    ('["tracking.uri=http://a:b@h", "x=y@z"]', '["tracking.uri=http://***@h", "x=y@z"]'),
    (r'["uri=http\\://a\\:b@h"]', r'["uri=http\\://***@h"]'),  # a job's overrides, as JSON
    ("https://h/api?token=abc&x=1&access_token=d#f",
     "https://h/api?token=***&x=1&access_token=***#f"),
    ("s3://b/k?X-Amz-Signature=abc&X-Amz-Credential=d&ok=1",
     "s3://b/k?X-Amz-Signature=***&X-Amz-Credential=***&ok=1"),
    ("https://h/?password=p;key=k", "https://h/?password=***;key=***"),
    ("sqlite:////a/b.db", "sqlite:////a/b.db"),
    ("mail me at a@b.c: lr=0.01", "mail me at a@b.c: lr=0.01"),
])
def test_credentials_in_uris_are_redacted(text, expected):
    assert redaction.redact(text) == expected


LEAKY_PROCESS = """
import logging, sys, warnings
from pipeline import redaction
redaction.install()
logging.basicConfig(level=logging.INFO, format="%(message)s")
log = logging.getLogger("leaky")
log.info("store %s", "http://u:hunter2@h")
try:
    raise RuntimeError("http://u:hunter2@h unreachable")
except RuntimeError:
    log.exception("failed")
warnings.warn("retrying http://u:hunter2@h")
print("View run at: http://u:hunter2@h/#/experiments/1")
sys.stderr.write("progress http://u:hunter2@h\\n")
raise SystemError("a bug, at http://u:hunter2@h")
"""


def test_logs_warnings_prints_and_tracebacks_are_redacted():
    import subprocess
    import sys

    assert errors.one_line(RuntimeError("API request to http://u:hunter2@h/api failed")) == \
        "API request to http://***@h/api failed"
    result = subprocess.run([sys.executable, "-c", LEAKY_PROCESS], capture_output=True,
                            text=True, timeout=60)
    printed = result.stdout + result.stderr
    assert result.returncode == 1 and "hunter2" not in printed, printed
    for shown in ("store http://***@h", "RuntimeError: http://***@h unreachable",
                  "retrying http://***@h", "View run at: http://***@h/#/experiments/1",
                  "progress http://***@h", "SystemError: a bug, at http://***@h"):
        assert shown in printed, (shown, printed)


class RecordingClient:
    tracking_uri = "http://u:hunter2@h"

    def __init__(self):
        self.calls = []

    def set_tag(self, run_id, key, value, synchronous=None):
        self.calls.append(value)

    def log_batch(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
        self.calls.extend([p.value for p in params] + [t.value for t in tags])

    def create_run(self, experiment_id, start_time=None, tags=None, run_name=None):
        self.calls.extend([*tags.values(), run_name])


def test_the_client_redacts_whatever_it_records():
    from mlflow.entities import Param, RunTag

    client = store.StoreClient(RecordingClient())
    client.set_tag("r", "error", "tracking store http://u:hunter2@h is not usable")
    client.log_batch("r", params=[Param("tracking.uri", "http://u:hunter2@h")],
                     tags=[RunTag("hydra_overrides", '["tracking.uri=http://u:hunter2@h"]')])
    client.create_run("0", tags={"sweep_overrides": "tracking.uri=http://u:hunter2@h"},
                      run_name="uni tracking.uri=http://u:hunter2@h")
    recorded = client._client.calls
    assert len(recorded) == 5 and all("http://***@h" in value for value in recorded), recorded
    assert client.tracking_uri == "http://u:hunter2@h"  # the client itself still uses it


def test_an_unusable_store_is_named_without_its_password(tmp_path):
    password = secrets.token_hex(8)
    uri = f"http://birnn:{password}@127.0.0.1:{free_port()}"
    result = stage("train", f"tracking.uri={uri}", *TINY, f"paths.models_dir={tmp_path}",
                   cwd=tmp_path, timeout=60)
    assert result.returncode == 1
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("error: tracking store http://***@127.0.0.1:")
    assert password not in result.stdout + result.stderr
    assert _files_holding(tmp_path, password) == []


def _files_holding(folder: Path, secret: str) -> list[str]:
    needle = secret.encode()
    return [str(path) for path in folder.rglob("*") if path.is_file()
            and needle in path.read_bytes()]


@pytest.mark.slow  # a server, a training and a sweep of two (about a minute)
def test_a_password_in_the_tracking_uri_is_recorded_nowhere(prepared_dir, tmp_path):
    password = "pw-" + secrets.token_hex(8)
    work = tmp_path / "work"
    work.mkdir()
    with mlflow_server(tmp_path / "server") as server:
        uri = f"http://birnn:{password}@127.0.0.1:{server.port}"
        common = (f"tracking.uri={uri}", "tracking.experiment_name=secrets",
                  f"paths.prepared_dir={prepared_dir}", f"paths.models_dir={work / 'models'}",
                  f"paths.metrics_dir={work / 'metrics'}", *TINY)
        single = stage("train", *common, cwd=work, timeout=300)
        sweep = stage("train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                      "model=uni,bi", f"hydra.sweep.dir={work / 'multirun' / 'secrets'}",
                      *common, cwd=work, timeout=300)
        assert single.returncode == 0, single.stderr[-3000:]
        assert sweep.returncode == 0, sweep.stderr[-3000:]
        client = MlflowClient(server.url)
        experiment = client.get_experiment_by_name("secrets").experiment_id
        recorded = client.search_runs([experiment])

    printed = single.stdout + single.stderr + sweep.stdout + sweep.stderr
    assert password not in printed
    assert _files_holding(tmp_path, password) == []  # store, artifacts, outputs/, models/, ...
    # ... and the places that held it hold the redacted URI instead.
    redacted = f"http://***@127.0.0.1:{server.port}"
    run_info = json.loads((work / "models" / "uni" / "run.json").read_text())
    assert run_info["tracking_uri"] == redacted
    assert OmegaConf.load(work / "models" / "uni" / "config.yaml").tracking.uri == redacted
    # Hydra's config.yaml, hydra.yaml, overrides.yaml of the run and of both jobs, the sweep's
    # multirun.yaml, the jobs' models/<name>/config.yaml.
    saved = [*(work / "outputs").rglob(".hydra/*.yaml"), *(work / "multirun").rglob("*.yaml")]
    assert len(saved) == 12 and all("***@127.0.0.1" in p.read_text() for p in saved), saved
    assert len(recorded) == 4  # the single run, the sweep's parent and its two jobs
    assert all("***@127.0.0.1" in run.data.tags["hydra_overrides"] for run in recorded
               if "hydra_overrides" in run.data.tags)
