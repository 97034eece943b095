"""The stages' task functions called in-process with composed configs (as a Hydra sweeper or a
notebook would), and the rule that best and last parameters are tested each on their own."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from birnn.data import scale_pixels
from birnn.models import build_model
from birnn.training import evaluate
from pipeline import prepared_data, schema
from pipeline.paths import CONF_DIR
from pipeline.stages import evaluate as evaluate_stage
from pipeline.stages import train as train_stage
from pipeline.tracking import runs, store
from pipeline_testkit import TINY


@pytest.fixture
def task_config(tmp_path, prepared_dir):
    """compose(<stage>, *overrides) with the paths and store under tmp_path, as Hydra would
    hand it to the task (HydraConfig set, the hydra node removed)."""
    paths = [f"paths.prepared_dir={prepared_dir}", f"paths.models_dir={tmp_path / 'models'}",
             f"paths.metrics_dir={tmp_path / 'metrics'}",
             f"paths.evaluation_dir={tmp_path / 'evaluation'}",
             f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        def make(name: str, *overrides: str):
            cfg = compose(name, overrides=[*paths, *overrides], return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
            with open_dict(cfg):
                del cfg["hydra"]
            return schema.validate(cfg)
        yield make
    GlobalHydra.instance().clear()


def test_train_task_returns_the_best_validation_loss(task_config, tmp_path):
    cfg = task_config("train", *TINY)
    objective = train_stage.train_task(cfg)
    summary = json.loads((tmp_path / "metrics" / "train_uni.json").read_text())
    assert objective == summary["best_val_loss"] and np.isfinite(objective)
    assert (tmp_path / "models" / "uni" / "best.npz").is_file()
    assert (tmp_path / "metrics" / "history_uni.csv").read_text().startswith("epoch,")


def test_what_follows_training_is_configuration(task_config, tmp_path):
    # A sweep job's defaults (conf/train.yaml, hydra.sweeper.params) on a single run: the same
    # code tests the model into its run and registers nothing.
    cfg = task_config("train", *TINY, "register_model=false", "test_after_training=true")
    train_stage.train_task(cfg)
    client = store.connect(cfg.tracking)
    written = json.loads((tmp_path / "metrics" / "test_uni.json").read_text())["uni"]
    run_id = json.loads((tmp_path / "models" / "uni" / "run.json").read_text())["run_id"]
    tracked = client.get_run(run_id).data.metrics
    assert tracked["test_acc_best"] == written["best"]["accuracy"]
    assert tracked["test_acc_last"] == written["last"]["accuracy"]
    assert client.search_registered_models() == []
    assert "registered_model" not in json.loads((tmp_path / "models" / "uni" / "run.json")
                                                .read_text())


def test_train_task_registers_its_model_and_upgrades_an_older_experiment(task_config,
                                                                         tmp_path):
    cfg = task_config("train", *TINY)
    client = store.connect(cfg.tracking)
    older = client.create_experiment(cfg.tracking.experiment_name)  # as the code before did
    train_stage.train_task(cfg)

    experiment = client.get_experiment(older)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.tags["mlflow.note.content"] == store.EXPERIMENT_DESCRIPTION
    info = json.loads((tmp_path / "models" / "uni" / "run.json").read_text())
    version = client.get_model_version("birnn-mnist-uni", info["model_version"])
    assert version.run_id == info["run_id"] and info["model_uri"].endswith("/uni-mnist-seed0")
    assert client.get_logged_model(info["model_id"]).source_run_id == info["run_id"]


def _two_different_models(kind: str = "uni"):
    sizes = {"hidden_size": 8} if kind == "uni" else {"hidden_fwd": 4, "hidden_bwd": 4}
    return build_model(kind, seed=1, **sizes), build_model(kind, seed=2, **sizes)


def _accuracy(model, prepared_dir) -> float:
    meta = prepared_data.read_meta(prepared_dir)
    images, labels = prepared_data.load(prepared_dir, "test", meta)
    return evaluate(model, scale_pixels(images, model.dtype), labels).accuracy


def test_evaluate_tests_the_best_and_the_last_parameters_each(task_config, tmp_path,
                                                             prepared_dir):
    best, last = _two_different_models()
    cfg = task_config("evaluate", "models=[uni]")
    client = store.connect(cfg.tracking)
    with runs.new_run(client, "tests", "uni", {}) as run_id:
        pass
    folder = tmp_path / "models" / "uni"
    best.save(folder / "best.npz")
    last.save(folder / "last.npz")
    meta = prepared_data.read_meta(prepared_dir)
    (folder / "run.json").write_text(json.dumps(
        {"run_id": run_id, "dataset": "mnist", "data_sha256": prepared_data.fingerprint(meta)}))

    evaluate_stage.evaluate_task(cfg)

    expected = {"best": _accuracy(best, prepared_dir), "last": _accuracy(last, prepared_dir)}
    assert expected["best"] != expected["last"]  # else the test could not tell them apart
    tracked = client.get_run(run_id).data.metrics
    written = json.loads((tmp_path / "metrics" / "test.json").read_text())["uni"]
    for rule, accuracy in expected.items():
        assert tracked[f"test_acc_{rule}"] == accuracy
        assert written[rule]["accuracy"] == accuracy


def test_a_sweep_jobs_self_test_tests_the_best_and_the_last_parameters_each(
        task_config, prepared_dir):
    best, last = _two_different_models("bi")
    cfg = task_config("train", "model=bi")
    client = store.connect(cfg.tracking)
    result = SimpleNamespace(best_params=best.params, last_params=last.params)
    model = build_model("bi", seed=3, hidden_fwd=4, hidden_bwd=4)
    meta = prepared_data.read_meta(prepared_dir)
    with runs.new_run(client, "tests", "bi", {}) as run_id:
        entry = train_stage.self_test(client, run_id, cfg, model, result, prepared_dir, meta)

    expected = {"best": _accuracy(best, prepared_dir), "last": _accuracy(last, prepared_dir)}
    assert expected["best"] != expected["last"]
    tracked = client.get_run(run_id).data.metrics
    for rule, accuracy in expected.items():
        assert tracked[f"test_acc_{rule}"] == accuracy and entry[rule]["accuracy"] == accuracy
