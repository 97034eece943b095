"""The MLflow Model of a birnn classifier (pipeline/tracking/logged_model.py): logged into a
run of a throwaway SQLite store, loaded back through every URI form, registered and aliased,
and served over HTTP; its digits must be the numpy model's and the evaluate stage's.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.exceptions import MlflowException
from mlflow.models import Model, infer_signature
from mlflow.tracking import MlflowClient

from birnn.data import scale_pixels
from birnn.models import build_model
from birnn.training import evaluate
from pipeline.tracking import logged_model
from pipeline_testkit import http, model_server

MODELS = {"uni": {"kind": "uni", "hidden_size": 8, "seed": 0},
          "bi": {"kind": "bi", "hidden_fwd": 6, "hidden_bwd": 4, "merge": "concat", "seed": 1,
                 "dtype": "float32"}}


def images(n: int, seed: int = 0) -> np.ndarray:
    """Synthetic MNIST-like uint8 images (N, 28, 28): a bright random blob on black."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 28, 28), dtype=np.uint8)
    for img in out:
        r, c = rng.integers(4, 20, size=2)
        img[r:r + 8, c:c + rng.integers(2, 8)] = rng.integers(0, 256, size=(8, 1), dtype=np.uint8)
    out[: n // 2] |= rng.integers(0, 64, size=(n // 2, 28, 28), dtype=np.uint8)  # noisy ones
    return out


def evaluate_stage_predictions(model, imgs: np.ndarray) -> np.ndarray:
    """The evaluate stage's digits: evaluate(model, scale_pixels(images, model.dtype), labels)."""
    labels = np.zeros(len(imgs), np.int64)
    return evaluate(model, scale_pixels(imgs, model.dtype), labels).predictions


@pytest.fixture(autouse=True)
def temporary_files_in_tmp_path(tmp_path, monkeypatch):
    """MLflow stages and downloads models in tempfile folders: keep them in tmp_path."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating one costs seconds of schema migrations)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("logged-model-test",
                                             artifact_location=(root / "artifacts").as_uri())
    return client, experiment_id, root


@pytest.fixture
def use_store(store, monkeypatch):
    """The store as MLflow's default (for loading models:/ and runs:/ URIs)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store[0].tracking_uri)
    saved = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(store[0].tracking_uri)
    yield store
    mlflow.set_tracking_uri(saved)


def new_run(store, name: str = "uni") -> str:
    client, experiment_id, _ = store
    return client.create_run(experiment_id, run_name=name).info.run_id


def saved_model(tmp_path: Path, kind: str = "uni"):
    config = dict(MODELS[kind])
    model = build_model(config.pop("kind"), **config)
    path = tmp_path / f"{kind}.npz"
    model.save(path)
    return model, path


@pytest.mark.parametrize("kind", MODELS)
def test_loaded_model_predicts_the_numpy_models_digits(use_store, tmp_path, kind):
    client, _, _ = use_store
    model, path = saved_model(tmp_path, kind)
    run_id = new_run(use_store, kind)
    started = time.perf_counter()
    info = logged_model.log_model(client, run_id, path, input_example=images(3))
    print(f"log_model: {time.perf_counter() - started:.2f} s")
    imgs = images(200, seed=1)
    expected = evaluate_stage_predictions(model, imgs)
    logits, _ = model.forward(scale_pixels(imgs, model.dtype))
    assert np.array_equal(expected, np.argmax(logits, axis=1))
    assert len(set(expected.tolist())) > 1, "a model predicting one digit tests little"

    assert info.model_uri == f"models:/{info.model_id}"
    for uri in (f"runs:/{run_id}/model", info.model_uri):
        started = time.perf_counter()
        pyfunc = mlflow.pyfunc.load_model(uri)
        print(f"load {uri}: {time.perf_counter() - started:.2f} s")
        digits = pyfunc.predict(logged_model.images_frame(imgs))
        assert digits.dtype == np.int64 and digits.shape == (200,)
        assert np.array_equal(digits, expected), uri
    # Same digits for uint8 columns and, on the Python object itself, for a plain matrix.
    frame = logged_model.images_frame(imgs).astype(np.uint8)
    assert np.array_equal(pyfunc.predict(frame), expected)
    python_model = pyfunc.unwrap_python_model()
    assert np.array_equal(python_model.predict(None, imgs.reshape(200, 784)), expected)
    assert python_model.classifier.config == model.config


def test_signature_example_requirements_and_run_left_alone(store, tmp_path, monkeypatch):
    client, experiment_id, _ = store
    _, path = saved_model(tmp_path)
    run_id = new_run(store)
    client.log_param(run_id, "model.hidden_size", "8")
    client.set_terminated(run_id, "FINISHED")      # evaluate logs into finished training runs
    ended = client.get_run(run_id).info.end_time
    elsewhere = "sqlite:///" + str(tmp_path / "not-this-one.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)   # the client decides, not the env
    mlflow.set_tracking_uri(elsewhere)

    info = logged_model.log_model(client, run_id, path, name="best", input_example=images(3),
                                  tags={"rule": "best"})

    # The client's store was written to, and the process's tracking URI is as it was (a
    # second task in the same process must not inherit this store).
    assert mlflow.get_tracking_uri() == elsewhere
    assert os.environ["MLFLOW_TRACKING_URI"] == elsewhere
    assert not (tmp_path / "not-this-one.db").exists()
    assert mlflow.active_run() is None
    run = client.get_run(run_id)
    assert (run.info.status, run.info.end_time) == ("FINISHED", ended)
    assert [o.model_id for o in run.outputs.model_outputs] == [info.model_id]
    model = client.get_logged_model(info.model_id)
    assert (model.experiment_id, model.name, model.source_run_id, str(model.status)) == \
        (experiment_id, "best", run_id, "READY")
    assert model.params == {"model.hidden_size": "8"}
    assert model.tags["birnn.kind"] == "uni" and model.tags["rule"] == "best"

    local = Path(mlflow.artifacts.download_artifacts(  # models:/ would read the global URI
        artifact_uri=model.artifact_location, dst_path=str(tmp_path / "downloaded")))
    mlmodel = Model.load(local)
    example = logged_model.images_frame(images(3))
    assert mlmodel.signature == logged_model.model_signature()
    with pytest.warns(UserWarning, match="integer column"):  # "...cannot represent missing values"
        assert mlmodel.signature == infer_signature(example, np.zeros(3, dtype=np.int64))
    assert mlmodel.load_input_example(local).equals(example)
    serving = json.loads((local / "serving_input_example.json").read_text())
    assert serving["dataframe_split"]["columns"] == logged_model.PIXEL_COLUMNS
    requirements = (local / "requirements.txt").read_text().split()
    assert sorted(r.split("==")[0] for r in requirements) == sorted(logged_model.REQUIREMENTS)
    assert (local / "code" / "birnn" / "models.py").is_file()       # birnn travels with it
    assert (local / "logged_model.py").is_file()                    # models from code, no pickle
    assert not list(local.rglob("*.pkl"))
    assert mlmodel.metadata["birnn_config"]["hidden_size"] == 8


@pytest.mark.filterwarnings("ignore:.*input example was not provided")
def test_a_running_run_stays_running_and_a_failed_log_leaves_no_active_run(store, tmp_path,
                                                                           monkeypatch):
    client, _, _ = store
    _, path = saved_model(tmp_path)
    run_id = new_run(store)                 # the train stage logs its model mid-run
    info = logged_model.log_model(client, run_id, path)
    assert client.get_run(run_id).info.status == "RUNNING"
    assert mlflow.active_run() is None
    assert [o.model_id for o in client.get_run(run_id).outputs.model_outputs] == [info.model_id]

    def store_fails(**kwargs):
        assert mlflow.active_run().info.run_id == run_id   # logged inside the run
        raise MlflowException("the store went away")

    monkeypatch.setattr(mlflow.pyfunc, "log_model", store_fails)
    with pytest.raises(MlflowException, match="went away"):
        logged_model.log_model(client, run_id, path, name="second")
    assert mlflow.active_run() is None
    assert client.get_run(run_id).info.status == "RUNNING"


@pytest.mark.filterwarnings("ignore:.*input example was not provided")
def test_input_contract_is_enforced(use_store, tmp_path):
    client, _, _ = use_store
    _, path = saved_model(tmp_path)
    info = logged_model.log_model(client, new_run(use_store), path)
    pyfunc = mlflow.pyfunc.load_model(info.model_uri)
    frame = logged_model.images_frame(images(4))

    with pytest.raises(MlflowException, match="float64 to int64"):
        pyfunc.predict(frame / 255.0)                       # pre-scaled pixels
    with pytest.raises(MlflowException, match="missing inputs"):
        pyfunc.predict(frame.drop(columns="pixel783"))
    with pytest.raises(MlflowException):
        pyfunc.predict(images(4).reshape(4, 784))           # the pyfunc takes the DataFrame
    too_bright = frame.copy()
    too_bright.iloc[0, 5] = 256
    # A loaded model runs its own copy of logged_model.py, so its PixelInputError is another
    # class than logged_model.PixelInputError: catch ValueError (or MlflowException).
    with pytest.raises(ValueError, match="0..255") as error:
        pyfunc.predict(too_bright)
    assert type(error.value).__name__ == "PixelInputError"
    assert isinstance(error.value, MlflowException)
    with pytest.raises(ValueError, match="no pixel above 1"):   # [0, 1] pixels cast to int
        pyfunc.predict(frame.clip(upper=1))
    blank = frame * 0
    assert pyfunc.predict(blank).shape == (4,)                  # a black image is an image
    with pytest.raises(ValueError, match="784 pixel values"):
        pyfunc.unwrap_python_model().predict(None, images(4))   # (N, 28, 28): reshape first
    assert pyfunc.predict(frame.iloc[:0]).shape == (0,)


def test_test_metrics_attach_to_the_logged_model(store, tmp_path):
    client, _, _ = store
    _, path = saved_model(tmp_path)
    run_id = new_run(store)
    client.log_metric(run_id, "param_count", 386.0, step=0)      # at the model's step: copied
    client.log_metric(run_id, "val_loss", 2.0, step=5)           # at another step: not
    info = logged_model.log_model(client, run_id, path, input_example=images(2))

    logged_model.log_model_metrics(client, info.model_id, {"test_loss": 1.25, "test_acc": 0.5},
                                   dataset_name="mnist-test", dataset_digest="abc123")

    metrics = {m.key: m for m in client.get_logged_model(info.model_id).metrics}
    assert set(metrics) == {"param_count", "test_loss", "test_acc"}
    assert metrics["test_acc"].value == 0.5 and metrics["test_acc"].dataset_name == "mnist-test"
    assert client.get_run(run_id).data.metrics["test_loss"] == 1.25
    assert len(client.get_metric_history(run_id, "test_loss")) == 1
    assert len(client.get_metric_history(run_id, "param_count")) == 1   # copy was deduplicated


def test_registered_alias_book_loads_the_same_model(use_store, tmp_path, capfd):
    client, _, _ = use_store
    imgs = images(50, seed=2)
    uni, uni_path = saved_model(tmp_path, "uni")
    bi, bi_path = saved_model(tmp_path, "bi")
    first = logged_model.log_model(client, new_run(use_store, "uni"), uni_path,
                                   input_example=images(2), registered_model_name="digits")
    second = logged_model.log_model(client, new_run(use_store, "bi"), bi_path,
                                    input_example=images(2))
    version = logged_model.register_model(client, second.model_id, "digits")
    assert (first.registered_model_version, int(version.version)) == (1, 2)
    printed = capfd.readouterr()   # a stage's stderr is for errors: no MLflow chatter
    assert "Successfully registered" not in printed.out + printed.err
    assert "Validating input example" not in printed.err and "Downloading" not in printed.err
    assert version.source == f"models:/{second.model_id}"   # (its model_id field stays None)
    assert '"version": 2' in client.get_logged_model(second.model_id).tags["mlflow.modelVersions"]

    uri = logged_model.set_alias(client, "digits", first.registered_model_version)
    assert uri == "models:/digits@book"
    assert str(client.get_model_version_by_alias("digits", "book").version) == "1"
    assert np.array_equal(mlflow.pyfunc.load_model(uri).predict(logged_model.images_frame(imgs)),
                          evaluate_stage_predictions(uni, imgs))
    logged_model.set_alias(client, "digits", 2)                    # the alias moves
    assert np.array_equal(mlflow.pyfunc.load_model(uri).predict(logged_model.images_frame(imgs)),
                          evaluate_stage_predictions(bi, imgs))


def test_served_alias_answers_with_the_numpy_models_digits(store, tmp_path):
    client, _, _ = store
    model, path = saved_model(tmp_path, "bi")
    info = logged_model.log_model(client, new_run(store, "bi"), path, input_example=images(2),
                                  registered_model_name="served-digits")
    uri = logged_model.set_alias(client, "served-digits", info.registered_model_version)
    imgs = images(20, seed=3)
    with model_server(uri, client.tracking_uri, tmp_path) as url:
        frame = logged_model.images_frame(imgs)
        status, body = http(f"{url}/invocations",
                            {"dataframe_split": frame.to_dict(orient="split", index=False)})
        assert status == 200
        digits = json.loads(body)["predictions"]
        assert digits == evaluate_stage_predictions(model, imgs).tolist()
        # Pixels scaled to [0, 1]: the server casts them to int64 (0s and 1s) before the
        # model sees them; the model refuses images whose brightest pixel is 1.
        bright = imgs.copy()
        bright[:, 0, 0] = 255
        scaled = logged_model.images_frame(bright) / 255
        with pytest.raises(urllib.error.HTTPError) as refused:
            http(f"{url}/invocations", {"dataframe_split": scaled.to_dict(orient="split", index=False)})
        assert refused.value.code == 400
        assert "no pixel above 1" in refused.value.read().decode()
