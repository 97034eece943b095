"""The stages through their real entry points: bad input, and the whole pipeline end to end.

The end-to-end tests run `dvc repro` in a temporary copy of the project (its own git
repository, DVC cache and mlflow.db) and then check the runs, the metrics and the report
through MlflowClient and the files, load the logged models and serve a registered one.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import prepared_data
from pipeline.tracking import runs
from pipeline.metric_names import PER_CLASS_TABLE, SUMMARY_METRICS
from pipeline_testkit import (CHECKPOINT_METRICS, RAW_MNIST, TEST_METRICS, commit_all,
                              copy_project, dvc, error_lines, http, model_server, prepare_into,
                              raw_copy, run, stage)



# ----------------------------------------------------------------------------- bad input
def test_checksum_mismatch_fails_in_one_line_and_writes_nothing(tmp_path):
    raw = raw_copy(tmp_path)
    labels = raw / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(labels.read_bytes())
    data[-20] ^= 0xFF  # one flipped byte
    labels.write_bytes(bytes(data))
    out = tmp_path / "prepared"

    result = prepare_into(raw, out)

    assert result.returncode == 1
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {labels}: sha256 mismatch")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # not even a temp folder


def test_corrupt_file_with_matching_checksum_fails_in_one_line(tmp_path):
    raw = raw_copy(tmp_path)
    images = raw / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:5000])  # truncated gzip stream
    manifest = raw / "SHA256SUMS"
    from birnn.data import sha256_file

    manifest.write_text(re.sub(r"^\w+(  t10k-images)", lambda m: sha256_file(images) + m.group(1),
                               manifest.read_text(), flags=re.M))
    out = tmp_path / "prepared"
    result = prepare_into(raw, out)
    assert result.returncode == 1
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith(f"error: {images}: corrupt gzip stream")
    assert not out.exists()


def test_missing_fashion_mnist_names_the_package(tmp_path):
    missing = tmp_path / "fashion-mnist"
    result = stage("prepare", "data=fashion_mnist", f"data.raw_dir={missing}",
                   f"paths.prepared_dir={tmp_path / 'prepared'}", timeout=60)
    assert result.returncode == 1
    assert error_lines(result) == [
        f"error: {missing}: dataset 'fashion_mnist' not found: "
        "apt-get install dataset-fashion-mnist"]


def test_prepare_writes_the_books_split_as_uint8(prepared_dir):
    meta = prepared_data.read_meta(prepared_dir)
    assert meta["counts"] == {"train": 55000, "val": 5000, "test": 10000}
    assert meta["dataset"] == "mnist" and meta["split_seed"] == 0
    assert meta["raw_files"]["verified_against"].endswith("SHA256SUMS")
    images, labels = prepared_data.load(prepared_dir, "val", meta)
    assert images.dtype == "uint8" and images.shape == (5000, 28, 28) and labels.dtype == "int64"
    assert images.max() == 255


def test_prepare_is_byte_reproducible(prepared_dir, tmp_path):
    again = tmp_path / "again"
    assert prepare_into(RAW_MNIST, again).returncode == 0
    assert prepared_data.read_meta(again)["files_sha256"] == prepared_data.read_meta(prepared_dir)["files_sha256"]


def test_diverging_training_fails_marks_its_run_and_writes_no_model(prepared_dir, tmp_path):
    db = tmp_path / "mlflow.db"
    result = stage("train", "experiment=quick", "train.epochs=1", "model.lr=1e308",
                   f"paths.prepared_dir={prepared_dir}", f"paths.models_dir={tmp_path / 'models'}",
                   f"paths.metrics_dir={tmp_path / 'metrics'}", f"tracking.uri=sqlite:///{db}",
                   timeout=120)
    assert result.returncode == 1
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert re.match(r"error: .* became (inf|nan|non-finite) at epoch 0, iteration \d+", lines[0])
    models = tmp_path / "models"
    assert not models.exists() or not any(models.iterdir())  # no model, not even a temp folder
    assert not (tmp_path / "metrics").exists()
    client = MlflowClient(f"sqlite:///{db}")
    (failed,) = client.search_runs([client.get_experiment_by_name("birnn-table-19-12").experiment_id])
    assert failed.info.status == "FAILED" and failed.info.run_name == "uni-mnist-seed0"
    assert failed.data.tags["error"] == lines[0].removeprefix("error: ")


def test_evaluate_without_training_names_the_missing_file(prepared_dir, tmp_path):
    result = stage("evaluate", f"paths.prepared_dir={prepared_dir}",
                   f"paths.models_dir={tmp_path / 'models'}",
                   f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", timeout=60)
    assert result.returncode == 1
    assert error_lines(result) == [
        f"error: {tmp_path / 'models' / 'uni' / 'best.npz'}: no such file: train this model "
        "first (python -m pipeline.stages.train dataset=mnist model=uni)"]


def test_prepare_refuses_to_file_one_dataset_under_anothers_name(tmp_path):
    out = tmp_path / "prepared"
    result = stage("prepare", "data.name=fashion_mnist", f"paths.prepared_dir={out}", timeout=60)
    assert result.returncode == 1
    assert error_lines(result) == [
        "error: config error: data.name: 'fashion_mnist' is the name of "
        "conf/data/fashion_mnist.yaml, not of data=mnist: choose it with data=fashion_mnist, "
        "or give these files a name of their own"]
    assert not out.exists()


@pytest.mark.parametrize("stage_name", ["train", "evaluate"])
def test_a_stage_refuses_prepared_data_of_another_dataset(stage_name, prepared_dir, tmp_path):
    result = stage(stage_name, "dataset=fashion_mnist", f"paths.prepared_dir={prepared_dir}",
                   f"paths.models_dir={tmp_path / 'models'}",
                   f"paths.metrics_dir={tmp_path / 'metrics'}",
                   f"paths.evaluation_dir={tmp_path / 'evaluation'}",
                   f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", timeout=60)
    assert result.returncode == 1
    assert error_lines(result) == [
        f"error: {prepared_dir / 'meta.json'}: holds 'mnist' data, not 'fashion_mnist' (the "
        "configured dataset): set dataset=mnist to use it, or run python -m "
        "pipeline.stages.prepare data=fashion_mnist"]
    assert not (tmp_path / "models").exists() and not (tmp_path / "metrics").exists()


def test_evaluate_refuses_a_model_trained_on_other_data(prepared_dir, tmp_path):
    from omegaconf import OmegaConf

    from pipeline.tracking import runs, store

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = store.connect(OmegaConf.create({"uri": db, "probe_timeout_seconds": 5}))
    with runs.new_run(client, "tests", "uni", {}) as run_id:
        pass
    model_dir = tmp_path / "models" / "uni"
    model_dir.mkdir(parents=True)
    (model_dir / "run.json").write_text(json.dumps(
        {"run_id": run_id, "dataset": "fashion_mnist", "data_sha256": "0" * 64}))
    result = stage("evaluate", "models=[uni]", f"paths.prepared_dir={prepared_dir}",
                   f"paths.models_dir={tmp_path / 'models'}", f"tracking.uri={db}", timeout=60)
    assert result.returncode == 1
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith(f"error: {model_dir}: trained on fashion_mnist")
    assert lines[0].endswith(": retrain it") and "holds mnist data" in lines[0]


# ----------------------------------------------------------------------------- end to end
def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


DATASETS = ("mnist", "fashion_mnist")  # params.yaml's


def stage_order(dataset: str) -> list[str]:
    return [f"prepare@{dataset}", f"train@{dataset}-uni", f"train@{dataset}-bi",
            f"evaluate@{dataset}", f"compare@{dataset}"]


def assert_ran_in_order(output: str, expected: list[str]) -> None:
    """``expected`` ran, nothing else did, and each dataset's stages ran in pipeline order."""
    ran = ran_stages(output)
    assert sorted(ran) == sorted(expected)
    for dataset in DATASETS:
        order = stage_order(dataset)
        assert [s for s in ran if s in order] == [s for s in expected if s in order]


def run_pipeline(tmp_path_factory, preset: str) -> dict:
    project = copy_project(tmp_path_factory.mktemp(f"project_{preset}"))
    params = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(params.replace("experiment: book", f"experiment: {preset}"))
    commit_all(project, f"preset {preset}")  # so that runs record a clean tree (git_dirty)
    output = dvc(project, "repro", timeout=3600)
    return {"project": project, "output": output,
            "client": MlflowClient(f"sqlite:///{project / 'mlflow.db'}")}


def training_run(pipeline: dict, name: str, dataset: str = "mnist"):
    run_json = pipeline["project"] / "models" / dataset / name / "run.json"
    return pipeline["client"].get_run(json.loads(run_json.read_text())["run_id"])


def assert_report_equals_tracked_metrics(pipeline: dict, dataset: str = "mnist") -> None:
    project = pipeline["project"]
    report = project / "reports" / "table_19_12" / dataset
    table = pd.read_csv(report / "table.csv", keep_default_na=False)
    markdown = (report / "report.md").read_text()
    test_json = json.loads((project / "metrics" / dataset / "test.json").read_text())
    rows = {(q, r): row for q, r, row in zip(table["quantity"], table["rule"], table.to_dict("records"))}
    for name in ("uni", "bi"):
        tracked = training_run(pipeline, name, dataset).data
        assert int(rows[("parameter count", "")][f"ours_{name}"]) == int(tracked.params["param_count"])
        for rule in ("best", "last"):
            accuracy = tracked.metrics[f"test_acc_{rule}"]
            loss = tracked.metrics[f"test_loss_{rule}"]
            assert float(rows[("test accuracy", f"{rule} parameters")][f"ours_{name}"]) == accuracy
            assert float(rows[("test loss", f"{rule} parameters")][f"ours_{name}"]) == loss
            assert test_json[name][rule] == {"loss": loss, "accuracy": accuracy}
            assert f"{100 * accuracy:.2f}%" in markdown and f"{loss:.6f}" in markdown
    # the book's column is the quoted data, whatever we got
    assert list(rows[("parameter count", "")].values())[2:4] == [2281, 2060]
    for figure in ("validation_curves.png", "confusion_matrices.png"):
        assert f"]({figure})" in markdown
        assert (report / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    return run_pipeline(tmp_path_factory, "quick")


def test_quick_repro_runs_every_stage_for_every_dataset(quick):
    assert_ran_in_order(quick["output"], [s for d in DATASETS for s in stage_order(d)])


def test_fashion_mnist_gets_its_own_table_runs_and_registered_models(quick):
    assert_report_equals_tracked_metrics(quick, "fashion_mnist")
    page = (quick["project"] / "reports" / "table_19_12" / "fashion_mnist" / "report.md").read_text()
    assert page.startswith("# Table 19-12 reproduced: unidirectional vs bidirectional RNN on "
                           "sequential Fashion-MNIST")
    assert "the book's numbers are for MNIST" in page
    client = quick["client"]
    for name in ("uni", "bi"):
        run_ = training_run(quick, name, "fashion_mnist")
        assert run_.data.tags["dataset"] == "fashion_mnist"
        assert run_.info.run_id != training_run(quick, name).info.run_id
        version = client.get_model_version_by_alias(f"birnn-fashion_mnist-{name}", "quick")
        assert version.run_id == run_.info.run_id
    report = client.get_run(training_run(quick, "bi", "fashion_mnist").data.tags["report_run_id"])
    assert report.info.run_name == "table-19-12-fashion_mnist"


def test_compare_refuses_runs_of_another_dataset(quick, tmp_path):
    project = quick["project"]
    result = stage("compare", "dataset=fashion_mnist", *(
        f"paths.{key}_dir={project / key / 'mnist'}" for key in ("models", "metrics", "evaluation")),
        f"paths.reports_dir={tmp_path / 'reports'}", f"tracking.uri={quick['client'].tracking_uri}",
        timeout=120)
    assert result.returncode == 1
    assert error_lines(result) == [f"error: {project / 'models' / 'mnist'}: the models were "
                                   "trained on mnist, not fashion_mnist (their config.yaml): "
                                   "retrain"]
    assert not (tmp_path / "reports").exists()


@pytest.mark.parametrize("name, params", [("uni", 2282), ("bi", 2170)])
def test_training_run_has_every_checkpoint_metric_at_every_step(quick, name, params):
    client, run_ = quick["client"], training_run(quick, name)
    history = pd.read_csv(quick["project"] / "metrics" / "mnist" / f"history_{name}.csv")
    assert len(history) == 6  # quick: 3 epochs, a checkpoint every half epoch
    assert run_.info.status == "FINISHED" and run_.info.run_name == f"{name}-mnist-seed0"
    assert run_.data.params["dataset"] == "mnist" and run_.data.params["train.seed"] == "0"
    for key in CHECKPOINT_METRICS:
        logged = client.get_metric_history(run_.info.run_id, key)
        assert [m.step for m in logged] == history["iteration"].tolist()
        assert [m.value for m in logged] == pytest.approx(history[key].tolist(), rel=1e-12)
    assert history["iteration"].tolist() == [214, 429, 644, 859, 1074, 1289]
    assert run_.data.params["param_count"] == str(params)
    assert run_.data.params["model.kind"] == name and run_.data.params["train.epochs"] == "3"
    artifacts = {a.path for a in client.list_artifacts(run_.info.run_id)}
    assert {"best.npz", "last.npz", "history.csv", "config.yaml", "run.json"} <= artifacts
    # the curves, the summary and the test results: nothing else (no per-class metrics)
    assert set(run_.data.metrics) == {*CHECKPOINT_METRICS, *SUMMARY_METRICS, *TEST_METRICS}
    assert "train_loss" not in history and "batch_loss" in history  # named as the metrics


def test_training_runs_are_comparable_side_by_side(quick):
    uni, bi = training_run(quick, "uni").data, training_run(quick, "bi").data
    assert set(uni.metrics) == set(bi.metrics)
    # The same names for the same meaning; bi adds its merge; no infrastructure settings.
    assert set(bi.params) - set(uni.params) == {"model.merge"}
    assert set(uni.params) == {
        "model.kind", "dataset", "param_count", "param_count_by_tensor", "hidden_units", "hidden_sizes",
        "model.lr", "model.lr_milestones", "train.epochs", "train.batch_size",
        "train.checkpoint_every", "train.seed", "train.dtype", "train.val_limit",
        "data.train_samples", "data.val_samples"}   # (train_limit: unset, so no param)
    assert (uni.params["hidden_units"], uni.params["hidden_sizes"]) == ("32", "32")
    assert (bi.params["hidden_units"], bi.params["hidden_sizes"]) == ("40", "20+20")
    assert json.loads(bi.params["model.lr_milestones"]) == {"30": 0.008, "50": 0.005, "70": 0.002}
    assert json.loads(uni.params["model.lr_milestones"]) == {}
    assert bi.params["data.val_samples"] == "1000"  # the quick preset's val_limit, as used
    assert sum(json.loads(bi.params["param_count_by_tensor"]).values()) == 2170


def test_training_run_tags(quick):
    head = run(["git", "rev-parse", "HEAD"], cwd=quick["project"]).stdout.strip()
    meta = prepared_data.read_meta(quick["project"] / "data" / "prepared" / "mnist")
    for name in ("uni", "bi"):
        tags = training_run(quick, name).data.tags
        assert tags["mlflow.source.git.commit"] == head and tags["git_dirty"] == "false"
        assert tags["mlflow.source.name"] == "pipeline/stages/train.py"
        assert tags["model_kind"] == name and tags["seed"] == "0" and tags["preset"] == "quick"
        assert tags["data_sha256"] == prepared_data.fingerprint(meta) and tags["dataset"] == "mnist"
        assert json.loads(tags["hydra_overrides"]) == ["dataset=mnist", f"model={name}",
                                                      "experiment=quick"]


def test_test_metrics_and_report_equal_the_tracked_metrics(quick):
    for name in ("uni", "bi"):
        metrics = training_run(quick, name).data.metrics
        assert set(TEST_METRICS) <= set(metrics)
        assert all(0.0 <= metrics[key] <= 1.0 for key in TEST_METRICS if "acc" in key)
        assert metrics["test_acc_best"] > 0.3  # a real, if short, training: far above chance
    assert_report_equals_tracked_metrics(quick)
    markdown = (quick["project"] / "reports" / "table_19_12" / "mnist" / "report.md").read_text()
    assert "Preset `quick`" in markdown


def test_report_run_links_the_training_runs_without_folding_them(quick):
    client = quick["client"]
    trained = [training_run(quick, n) for n in ("uni", "bi")]
    assert not any("mlflow.parentRunId" in run_.data.tags for run_ in trained)  # top level
    (parent_id,) = {run_.data.tags["report_run_id"] for run_ in trained}
    parent = client.get_run(parent_id)
    assert parent.info.run_name == "table-19-12-mnist" and parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert artifacts >= {"report.md", "table.csv", "validation_curves.png",
                         "confusion_matrices.png"}
    assert parent.data.metrics == {}  # the numbers are the training runs' own


def test_descriptions_say_what_each_page_is(quick):
    client = quick["client"]
    experiment = client.get_experiment_by_name("birnn-table-19-12")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "press **Compare**" in experiment.tags["mlflow.note.content"]
    for name in ("uni", "bi"):
        run_ = training_run(quick, name)
        note = run_.data.tags["mlflow.note.content"]
        accuracy = run_.data.metrics["test_acc_best"]
        assert note.startswith(f"**{name}-mnist-seed0**: {'uni' if name == 'uni' else 'bi'}directional")
        assert f"Test accuracy {100 * accuracy:.2f}%" in note and "preset `quick`" in note
        assert f"MLflow model `{name}-mnist-seed0` (`runs:/{run_.info.run_id}/{name}-mnist-seed0`)" in note
    report_id = training_run(quick, "uni").data.tags["report_run_id"]
    note = client.get_run(report_id).data.tags["mlflow.note.content"]
    page = (quick["project"] / "reports" / "table_19_12" / "mnist" / "report.md").read_text()
    table = [line for line in page.splitlines() if line.startswith("|")]
    assert len(table) == 7 and all(line in note for line in table)  # table 19-12 itself
    for figure in ("validation_curves.png", "confusion_matrices.png"):  # from the run's artifacts
        assert f"](get-artifact?path={figure}&run_uuid={report_id})" in note
        assert f"]({figure})" in page


def test_runs_record_the_data_they_used(quick):
    meta = prepared_data.read_meta(quick["project"] / "data" / "prepared" / "mnist")
    for name in ("uni", "bi"):
        inputs = training_run(quick, name).inputs.dataset_inputs
        by_context = {i.tags[0].value: i.dataset for i in inputs
                      if i.tags and i.tags[0].key == "mlflow.data.context"}
        assert {c: d.name for c, d in by_context.items()} == {
            "train": "mnist-train", "validation": "mnist-val[:1000]", "test": "mnist-test"}
        for dataset in by_context.values():
            assert dataset.digest == prepared_data.fingerprint(meta)[:16]
            assert json.loads(dataset.source) == {"uri": "data/raw/mnist"}
        assert json.loads(by_context["test"].profile) == {"num_rows": 10000}


def test_per_class_results_are_a_table_not_metrics(quick, tmp_path):
    for name in ("uni", "bi"):
        run_ = training_run(quick, name)
        local = quick["client"].download_artifacts(run_.info.run_id, PER_CLASS_TABLE, str(tmp_path))
        table = pd.read_json(local, orient="split")
        assert list(table.columns) == ["rule", "digit", "images", "correct", "accuracy"]
        assert len(table) == 20
        for rule in ("best", "last"):
            rows = table[table["rule"] == rule]
            assert rows["digit"].tolist() == list(range(10)) and rows["images"].sum() == 10000
            assert rows["correct"].sum() / 10000 == run_.data.metrics[f"test_acc_{rule}"]
            assert rows["accuracy"].tolist() == pytest.approx(
                (rows["correct"] / rows["images"]).tolist(), abs=1e-9)  # JSON keeps 10 digits


@pytest.fixture
def store_as_default(quick, monkeypatch, tmp_path):
    """The quick pipeline's store as MLflow's default (runs:/ and models:/ URIs), and MLflow's
    downloads in tmp_path."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", quick["client"].tracking_uri)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return quick


def test_logged_models_predict_the_evaluate_stages_digits(store_as_default):
    from pipeline.tracking.logged_model import images_frame

    project = store_as_default["project"]
    meta = prepared_data.read_meta(project / "data" / "prepared" / "mnist")
    images, labels = prepared_data.load(project / "data" / "prepared" / "mnist", "test", meta)
    for name in ("uni", "bi"):
        run_ = training_run(store_as_default, name)
        digits = mlflow.pyfunc.load_model(f"runs:/{run_.info.run_id}/{name}-mnist-seed0").predict(
            images_frame(images))
        evaluated = pd.read_csv(project / "metrics" / "mnist" / f"predictions_{name}_best.csv")
        assert np.array_equal(digits, evaluated["predicted"].to_numpy())
        assert np.mean(digits == labels) == run_.data.metrics["test_acc_best"]
        # the test results of the best parameters are the logged model's own metrics
        model_id = json.loads((project / "models" / "mnist" / name / "run.json").read_text())["model_id"]
        on_model = {m.key: m for m in store_as_default["client"].get_logged_model(model_id).metrics}
        assert on_model["test_acc_best"].value == run_.data.metrics["test_acc_best"]
        assert on_model["test_acc_best"].dataset_name == "mnist-test"
        assert {"best_val_loss", "test_loss_best"} <= set(on_model)


def test_registered_versions_carry_the_presets_alias(quick):
    client = quick["client"]
    for name in ("uni", "bi"):
        version = client.get_model_version_by_alias(f"birnn-mnist-{name}", "quick")
        run_ = training_run(quick, name)
        assert version.run_id == run_.info.run_id
        # the registry's version page shows tags and the description, not the run's metrics
        accuracy = run_.data.metrics["test_acc_best"]
        assert version.tags["test_acc_best"] == f"{accuracy:.4f}"
        assert version.description.startswith(f"Test accuracy {100 * accuracy:.2f}% with the best")
        assert f"run {name}-mnist-seed0 ({run_.info.run_id})" in version.description
        assert client.get_registered_model(f"birnn-mnist-{name}").description.startswith(
            f"{'Uni' if name == 'uni' else 'Bi'}directional vanilla RNN")
        with pytest.raises(MlflowException):  # a quick model is no book model
            client.get_model_version_by_alias(f"birnn-mnist-{name}", "book")
    page = (quick["project"] / "reports" / "table_19_12" / "mnist" / "report.md").read_text()
    assert "`models:/birnn-mnist-bi@quick`" in page


def test_committed_outputs_hold_nothing_that_changes_on_a_rerun(quick):
    # Run ids, training times and registry versions live in MLflow: a rerun with the same
    # numbers leaves the committed report and metrics unchanged.
    client, project = quick["client"], quick["project"]
    page = (project / "reports" / "table_19_12" / "mnist" / "report.md").read_text()
    report_run = client.get_run(training_run(quick, "uni").data.tags["report_run_id"])
    for name in ("uni", "bi"):
        run = training_run(quick, name)
        assert run.info.run_id not in page and "train_seconds" in run.data.metrics
        summary = json.loads((project / "metrics" / "mnist" / f"train_{name}.json").read_text())
        assert "train_seconds" not in summary
        assert run.info.run_id in report_run.data.tags["mlflow.note.content"]
    assert report_run.info.run_id not in page
    assert "trained in" not in page and "(version" not in page
    assert "trained in" in report_run.data.tags["mlflow.note.content"]


def test_served_alias_answers_with_the_evaluate_stages_digits(quick, tmp_path):
    """`mlflow models serve -m models:/birnn-mnist-bi@quick --env-manager local` on 127.0.0.1, as
    docs/tracking.md shows for @book: 100 test images in, the evaluate stage's digits out."""
    from pipeline.tracking.logged_model import images_frame

    project = quick["project"]
    meta = prepared_data.read_meta(project / "data" / "prepared" / "mnist")
    images, _ = prepared_data.load(project / "data" / "prepared" / "mnist", "test", meta, limit=100)
    expected = pd.read_csv(project / "metrics" / "mnist" / "predictions_bi_best.csv")["predicted"][:100]
    with model_server("models:/birnn-mnist-bi@quick", quick["client"].tracking_uri, tmp_path) as url:
        frame = images_frame(images)
        status, body = http(f"{url}/invocations",
                            {"dataframe_split": frame.to_dict(orient="split", index=False)})
        assert status == 200
        assert json.loads(body)["predictions"] == expected.tolist()


def test_dvc_metrics_show_lists_both_models(quick):
    shown = json.loads(dvc(quick["project"], "metrics", "show", "--json"))
    for dataset in DATASETS:
        test_metrics = shown[""]["data"][f"metrics/{dataset}/test.json"]["data"]  # "": workspace
        for name in ("uni", "bi"):
            tracked = training_run(quick, name, dataset).data.metrics
            for rule in ("best", "last"):
                assert test_metrics[name][rule] == {"loss": tracked[f"test_loss_{rule}"],
                                                    "accuracy": tracked[f"test_acc_{rule}"]}


def test_second_repro_runs_nothing(quick):
    output = dvc(quick["project"], "repro")
    assert ran_stages(output) == [] and "Data and pipelines are up to date" in output


def test_a_forced_rerun_of_the_same_numbers_leaves_git_status_clean(quick):
    project = quick["project"]
    commit_all(project, "quick run")
    uni_before = training_run(quick, "uni").info.run_id

    output = dvc(project, "repro", "-f", "compare@mnist")

    assert_ran_in_order(output, stage_order("mnist"))
    assert training_run(quick, "uni").info.run_id != uni_before  # trained again, new run
    status = run(["git", "status", "--porcelain"], cwd=project)
    assert status.returncode == 0 and status.stdout == ""  # dvc.lock, metrics/, reports/
    assert_report_equals_tracked_metrics(quick)


def evaluation_lines(result) -> list[str]:
    """The lines in which evaluate says where it records a model whose training run is not
    known here."""
    return [line for line in (result.stdout + result.stderr).splitlines()
            if "its evaluation" in line and "WARNING" in line]


def outputs_copy(project, tmp_path) -> dict:
    """The project's MNIST model folders (without run.json) and metrics in tmp_path, and the
    overrides that point a stage at them and at an empty store there."""
    shutil.copytree(project / "models" / "mnist", tmp_path / "models")
    for run_json in (tmp_path / "models").rglob("run.json"):
        run_json.unlink()
    shutil.copytree(project / "metrics" / "mnist", tmp_path / "metrics")
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return {"db": db, "client": MlflowClient(db),
            "paths": (f"paths.models_dir={tmp_path / 'models'}",
                      f"paths.metrics_dir={tmp_path / 'metrics'}",
                      f"paths.evaluation_dir={tmp_path / 'evaluation'}",
                      f"paths.reports_dir={tmp_path / 'reports'}", f"tracking.uri={db}")}


def test_evaluate_and_compare_need_no_run_json_nor_the_training_store(quick, tmp_path):
    """As after dvc pull on another machine: the model folders without run.json, an empty
    store. evaluate writes the same files and records each model into a new run of the
    experiment named by its weights (one line each); run again, it adds no run; compare
    writes the same report and links those runs."""
    project = quick["project"]
    copy = outputs_copy(project, tmp_path)
    client = copy["client"]

    first = stage("evaluate", *copy["paths"], cwd=project, timeout=300)

    assert first.returncode == 0, first.stderr[-3000:]
    lines = evaluation_lines(first)
    assert len(lines) == 2, first.stderr
    for name, line in zip(("uni", "bi"), lines):
        assert f"{tmp_path / 'models' / name}: no run.json beside it" in line
        assert "recording its evaluation in a new run" in line
        assert "of experiment 'birnn-table-19-12', which names it by its weights' sha256" in line
    assert (tmp_path / "metrics" / "test.json").read_bytes() == \
        (project / "metrics" / "mnist" / "test.json").read_bytes()
    experiment = client.get_experiment_by_name("birnn-table-19-12")
    evaluations = client.search_runs([experiment.experiment_id], "tags.stage = 'evaluate'")
    assert len(evaluations) == 2
    test = json.loads((tmp_path / "metrics" / "test.json").read_text())
    for evaluation in evaluations:
        tags, name = evaluation.data.tags, evaluation.data.tags["model_name"]
        digest = runs.weights_digest(tmp_path / "models" / name)
        assert tags["weights_sha256_best"] == digest["best.npz"]
        assert tags["weights_sha256_last"] == digest["last.npz"]
        assert tags["dataset"] == "mnist" and tags["training_run"].startswith("not in this store")
        assert evaluation.info.run_name == f"{name}-mnist-seed0 (weights {digest['best.npz'][:12]})"
        assert evaluation.info.status == "FINISHED"
        assert evaluation.data.metrics["test_acc_best"] == test[name]["best"]["accuracy"]
        assert evaluation.data.params["model.kind"] == name
        assert "whose training run is not in this store" in evaluation.data.tags[
            "mlflow.note.content"]

    again = stage("evaluate", *copy["paths"], cwd=project, timeout=300)

    assert again.returncode == 0, again.stderr[-3000:]
    assert all("is recorded in run" in line for line in evaluation_lines(again))
    assert len(client.search_runs([experiment.experiment_id], "tags.stage = 'evaluate'")) == 2
    for evaluation in evaluations:  # one set of results each, not two
        assert len(client.get_metric_history(evaluation.info.run_id, "test_acc_best")) == 1

    compared = stage("compare", "preset=quick", *copy["paths"], cwd=project, timeout=300)

    assert compared.returncode == 0, compared.stderr[-3000:]
    for name in ("report.md", "table.csv"):
        assert (tmp_path / "reports" / "table_19_12" / "mnist" / name).read_bytes() == \
            (project / "reports" / "table_19_12" / "mnist" / name).read_bytes()
    [report] = client.search_runs([experiment.experiment_id], "tags.stage = 'compare'")
    assert sorted(report.data.tags["compared_run_ids"].split(",")) == \
        sorted(r.info.run_id for r in evaluations)


def test_compare_without_any_run_writes_the_same_report(quick, tmp_path):
    """compare alone against an empty store (no evaluate there): the page is the files'."""
    project = quick["project"]
    copy = outputs_copy(project, tmp_path)
    shutil.copytree(project / "evaluation" / "mnist", tmp_path / "evaluation")

    compared = stage("compare", "preset=quick", *copy["paths"], cwd=project, timeout=300)

    assert compared.returncode == 0, compared.stderr[-3000:]
    assert (tmp_path / "reports" / "table_19_12" / "mnist" / "report.md").read_bytes() == \
        (project / "reports" / "table_19_12" / "mnist" / "report.md").read_bytes()
    assert "the report run links no run for uni" in compared.stdout + compared.stderr


def test_compare_names_the_models_as_train_registers_them():
    from pipeline.stages import compare, train

    assert compare.REGISTERED_MODEL == train.REGISTERED_MODEL


def test_a_run_json_beside_other_weights_is_not_trusted(quick, tmp_path):
    """A run.json left beside other weights (an old commit's models restored by DVC, say)
    describes another model: evaluate records into a run of its own and says why."""
    project = quick["project"]
    copy = outputs_copy(project, tmp_path)
    models = tmp_path / "models"
    shutil.copy(project / "models" / "mnist" / "bi" / "run.json", models / "uni" / "run.json")

    result = stage("evaluate", *copy["paths"], cwd=project, timeout=300)

    assert result.returncode == 0, result.stderr[-3000:]
    uni, bi = evaluation_lines(result)
    assert uni.split(" - ", 1)[1].startswith(
        f"{models / 'uni'}: its run.json describes run {training_run(quick, 'bi').info.run_id}'s "
        "weights, not these (another training wrote them, or DVC restored them without it); "
        "recording its evaluation in a new run")
    assert f"{models / 'bi'}: no run.json beside it" in bi
    assert (tmp_path / "metrics" / "test.json").read_bytes() == \
        (project / "metrics" / "mnist" / "test.json").read_bytes()


def test_exp_run_with_a_bi_hyperparameter_reruns_only_what_depends_on_it(quick):
    project = quick["project"]
    uni_before = training_run(quick, "uni").info.run_id
    bi_before = training_run(quick, "bi").info.run_id
    commit_all(project, "quick run")  # dvc exp run starts from a commit

    output = dvc(project, "exp", "run", "-S", "conf/model/bi.yaml:lr=0.02", "compare@mnist")

    assert_ran_in_order(output, ["train@mnist-bi", "evaluate@mnist", "compare@mnist"])
    bi = training_run(quick, "bi")
    assert bi.info.run_id != bi_before and bi.data.params["model.lr"] == "0.02"
    assert bi.data.tags["git_dirty"] == "true"  # -S edited conf/model/bi.yaml, uncommitted
    assert training_run(quick, "uni").info.run_id == uni_before
    lr_history = quick["client"].get_metric_history(bi.info.run_id, "lr")
    assert [m.value for m in lr_history] == [0.02] * 6  # logged at every checkpoint
    assert_report_equals_tracked_metrics(quick)
    client = quick["client"]
    assert client.get_model_version_by_alias("birnn-mnist-bi", "quick").run_id == bi.info.run_id
    assert client.get_model_version_by_alias("birnn-mnist-uni", "quick").run_id == uni_before
    # evaluate reran on the unchanged uni: its run holds one set of test results, not two
    assert len(client.get_metric_history(uni_before, "test_acc_best")) == 1


# ----------------------------------------------------------------------------- the book
@pytest.mark.slow
def test_book_configuration_reproduces_table_19_12(tmp_path_factory):
    """100 epochs of each model, as the book (several minutes each), in a copy of the
    project whose committed outputs an AVX2 machine made: under the pinned numerics every
    training and evaluation writes them again byte for byte, whatever this machine's CPU
    (birnn.numerics), so compare, whose deps are then unchanged and whose report is
    committed, is skipped, and git sees no change."""
    book = run_pipeline(tmp_path_factory, "book")
    assert_ran_in_order(book["output"], [s for d in DATASETS for s in stage_order(d)
                                         if not s.startswith("compare@")])
    changed = subprocess.run(["git", "status", "--porcelain"], cwd=book["project"],
                             capture_output=True, text=True, check=True).stdout
    assert changed == "", f"the book pipeline changed committed files:\n{changed}"
    for dataset, least in (("mnist", 0.94), ("fashion_mnist", 0.80)):
        for name in ("uni", "bi"):
            run_ = training_run(book, name, dataset)
            assert len(book["client"].get_metric_history(run_.info.run_id, "val_loss")) == 200
            assert run_.data.metrics["test_acc_best"] >= least, (dataset, name, run_.data.metrics)
        assert_report_equals_tracked_metrics(book, dataset)
