"""Credentials never ride in a tracking URI (issue 14, item 4; pipeline/guard/credentials.py).

A URI carrying them, on the command line, in $MLFLOW_TRACKING_URI or in the config, is refused
in one line that names where and MLflow's credential variables, never the URI, before anything
is written. The end-to-end test trains through a real ``mlflow server`` behind basic auth with
the password in MLFLOW_TRACKING_PASSWORD, as a single run and as a parallel sweep, then
searches every byte the pipeline and the server wrote and everything printed for it.
"""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mlflow_server import basic_auth_proxy, mlflow_server
from pipeline.guard import credentials
from pipeline_testkit import TINY, error_lines, free_port, run, stage

CREDENTIAL_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                        "MLFLOW_TRACKING_TOKEN")


@pytest.mark.parametrize("uri, found", [
    ("http://user:pw@host:5000", "user info before '@'"),
    ("https://token@host/path", "user info before '@'"),          # a token as user name
    ("http://user:pa/ss@host:5000", "user info before '@'"),      # unencoded / in the password
    ("http://user:pa#ss@host", "user info before '@'"),           # unencoded # in it
    ("http://user:pa?ss@host", "user info before '@'"),
    ("postgresql+psycopg://mlflow:pw@db:5432/mlflow", "user info before '@'"),
    ("tracking.uri=http\\://u\\:p@h\\:5", "user info before '@'"),  # as Hydra escapes it
    ("https://h/api?token=abc", "query parameter 'token'"),
    ("https://h/api?x=1&access_token=d", "query parameter 'access_token'"),
    ("https://h/?api_key=k", "query parameter 'api_key'"),
    ("https://h/?password=p;x=1", "query parameter 'password'"),
    ("s3://b/k?X-Amz-Signature=abc", "query parameter 'X-Amz-Signature'"),
    ("http://127.0.0.1:5000", None),
    ("https://mlflow.example.org/prefix?sslmode=require", None),
    ("postgresql+psycopg://mlflow@127.0.0.1:5432/mlflow?passfile=/home/me/.pgpass", None),
    ("sqlite:////home/me@work/mlflow.db", None),                  # an @ in a path
    ("databricks", None),
    ("model.lr=0.01", None),
])
def test_credentials_in_a_uri_are_found(uri, found):
    assert credentials.found_in(uri) == found


def _secret() -> str:
    """A password with what once leaked past the redaction: '/', '#', and length."""
    return "pw/" + secrets.token_hex(8) + "#" + secrets.token_urlsafe(300)


def _files_holding(folder: Path, secret: str) -> list[str]:
    needles = [secret.encode(), secret[3:19].encode()]  # whole, or its random middle
    return [str(path) for path in folder.rglob("*") if path.is_file()
            and any(needle in path.read_bytes() for needle in needles)]


def _assert_refused(result, secret: str, where: str, folder: Path) -> None:
    lines = error_lines(result)
    assert result.returncode == 1, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and where in lines[0], lines
    assert all(name in lines[0] for name in CREDENTIAL_VARIABLES), lines[0]
    printed = result.stdout + result.stderr
    assert secret[3:19] not in printed and "birnn" not in printed and "://" not in printed
    assert _files_holding(folder, secret) == []


def test_a_uri_with_a_password_on_the_command_line_is_refused_before_anything_is_written(
        tmp_path):
    secret = _secret()
    uri = f"http://birnn:{secret}@127.0.0.1:{free_port()}"
    result = stage("train", f"tracking.uri={uri}", *TINY, f"paths.models_dir={tmp_path}/m",
                   cwd=tmp_path, timeout=60)
    _assert_refused(result, secret, "the command line (tracking.uri)", tmp_path)
    assert list(tmp_path.iterdir()) == []   # no outputs/ (Hydra's .hydra/*.yaml), no models/


def test_a_token_in_a_sweep_s_uri_is_refused_before_the_sweep_starts(tmp_path):
    secret = _secret()
    result = stage("train", "-m", "model=uni,bi",
                   f"tracking.uri=https://127.0.0.1:{free_port()}/?access_token={secret}",
                   f"hydra.sweep.dir={tmp_path}/multirun", cwd=tmp_path, timeout=60)
    _assert_refused(result, secret, "the command line (tracking.uri)", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_uri_with_a_token_in_the_environment_is_refused_before_anything_is_written(tmp_path):
    secret = _secret()
    result = stage("evaluate", cwd=tmp_path, timeout=60,
                   MLFLOW_TRACKING_URI=f"https://127.0.0.1:{free_port()}/?token={secret}")
    _assert_refused(result, secret, "$MLFLOW_TRACKING_URI", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_uri_with_a_password_in_the_config_is_refused_before_any_work(tmp_path):
    secret = _secret()
    conf = tmp_path / "conf" / "tracking"
    conf.mkdir(parents=True)
    (conf / "leaky.yaml").write_text(
        "defaults:\n  - default\n  - _self_\n\n"
        f"uri: 'postgresql://mlflow:{secret}@127.0.0.1:{free_port()}/mlflow'\n")
    work = tmp_path / "work"
    work.mkdir()
    result = stage("train", "--config-dir", str(tmp_path / "conf"), "tracking=leaky", *TINY,
                   f"paths.models_dir={work}/models", f"paths.metrics_dir={work}/metrics",
                   cwd=work, timeout=60)
    _assert_refused(result, secret, f"config file {conf / 'leaky.yaml'} (uri)", work / "models")
    # Found in the file before Hydra composed it and copied the result to its run folder.
    assert list(work.iterdir()) == []


def test_the_stale_runs_command_refuses_a_uri_with_a_password(tmp_path):
    secret = _secret()
    result = run([sys.executable, "-m", "pipeline.commands.close_stale_runs", "--tracking-uri",
                  f"http://birnn:{secret}@127.0.0.1:{free_port()}"], cwd=tmp_path, timeout=60)
    _assert_refused(result, secret, "--tracking-uri", tmp_path)


@pytest.mark.slow  # a server, a training and a sweep of two (about a minute)
def test_a_password_in_the_environment_is_recorded_nowhere(prepared_dir, tmp_path):
    password = _secret()
    work = tmp_path / "work"
    work.mkdir()
    with mlflow_server(tmp_path / "server") as server, \
            basic_auth_proxy(server, "birnn", password) as proxy:
        auth = {"MLFLOW_TRACKING_USERNAME": "birnn", "MLFLOW_TRACKING_PASSWORD": password}
        common = (f"tracking.uri={proxy.url}", "tracking.experiment_name=secrets",
                  f"paths.prepared_dir={prepared_dir}", *TINY)
        # A sweep's jobs write only under their own folders; the single training gets its own.
        outputs = (f"paths.models_dir={work / 'models'}", f"paths.metrics_dir={work / 'metrics'}")
        unauthenticated = stage("train", *common, *outputs, cwd=work, timeout=120)
        assert unauthenticated.returncode == 1 and proxy.refused   # the gate is real
        single = stage("train", *common, *outputs, cwd=work, timeout=300, **auth)
        sweep = stage("train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                      "model=uni,bi", f"hydra.sweep.dir={work / 'multirun' / 'secrets'}",
                      *common, cwd=work, timeout=300, **auth)
        assert single.returncode == 0, single.stderr[-3000:]
        assert sweep.returncode == 0, sweep.stderr[-3000:]
        client = MlflowClient(server.url)
        experiment = client.get_experiment_by_name("secrets").experiment_id
        recorded = client.search_runs([experiment])
        # (the proxy refused only the run without credentials)
        assert len(recorded) == 4  # the single run, the sweep's parent and its two jobs

    printed = "".join(r.stdout + r.stderr for r in (unauthenticated, single, sweep))
    assert password[3:19] not in printed
    # store, artifacts (models, config.yaml), outputs/ and multirun/ (Hydra's saved configs,
    # logs), models/, metrics/
    assert (work / "outputs").is_dir() and (work / "models" / "uni" / "run.json").is_file()
    assert _files_holding(tmp_path, password) == []
