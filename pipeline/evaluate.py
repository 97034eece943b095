"""Stage 3: test the best and the last parameters of every trained model.

    python -m pipeline.evaluate [models=[uni,bi]]

For each model in models/<name>/: loss, accuracy, per-class accuracy and confusion matrix on
the 10,000 test images, with the best-validation-loss parameters and with the last ones (the
book reports both). Results go into the model's own training run (its id is in
models/<name>/run.json) as test_loss_best, test_acc_best, test_loss_last, test_acc_last,
test_acc_<rule>_class<k> and confusion-matrix artifacts, and into files:

    metrics/test.json                         all models, both rules (dvc metrics show)
    evaluation/<name>/details.json            per-class accuracy and confusion matrices
    evaluation/<name>/predictions_<rule>.csv  actual,predicted (DVC's confusion plot)
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from birnn.data import scale_pixels
from birnn.models import load_model
from birnn.training import Evaluation, evaluate
from pipeline import figures, io, prepared, tracking
from pipeline.cli import StageError, stage
from pipeline.paths import project_path

log = logging.getLogger(__name__)

RULES = ("best", "last")


def test_model(model_dir: Path, rule: str, images, labels) -> tuple[Evaluation, int]:
    path = model_dir / f"{rule}.npz"
    try:
        model = load_model(path)
    except (OSError, ValueError) as exc:
        message = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
        raise StageError(message) from None
    return evaluate(model, scale_pixels(images, model.dtype), labels), model.param_count()["total"]


def run_metrics(results: dict[str, Evaluation]) -> dict[str, float]:
    metrics = {}
    for rule, ev in results.items():
        metrics[f"test_loss_{rule}"] = ev.loss
        metrics[f"test_acc_{rule}"] = ev.accuracy
        metrics.update({f"test_acc_{rule}_class{k}": float(acc)
                        for k, acc in enumerate(ev.per_class_accuracy)})
    return metrics


def details(results: dict[str, Evaluation]) -> dict:
    return {rule: {"loss": ev.loss, "accuracy": ev.accuracy,
                   "per_class_accuracy": [float(a) for a in ev.per_class_accuracy],
                   "confusion": ev.confusion.tolist()}
            for rule, ev in results.items()}


def track(client, run_id: str, name: str, results: dict[str, Evaluation], evaluated_on: str
          ) -> None:
    """The test results into the model's training run: metrics, details, confusion figures.
    Shared with sweep jobs, which test their own model (pipeline.train)."""
    tracking.log_metrics(client, run_id, run_metrics(results))
    client.log_dict(run_id, details(results), "evaluation/test_details.json")
    for rule, ev in results.items():
        client.log_figure(run_id, figures.confusion_matrices(
            {name: ev.confusion}, f"test set, {rule} parameters"),
            f"evaluation/confusion_{rule}.png")
    client.set_tag(run_id, "evaluated_on", evaluated_on)


@stage("evaluate")
def main(cfg: DictConfig) -> None:
    client = tracking.connect(cfg.tracking)
    data_dir = project_path(cfg.paths.prepared_dir)
    meta = prepared.read_meta(data_dir)
    images, labels = prepared.load(data_dir, "test", meta)
    models_dir = project_path(cfg.paths.models_dir)

    summary, per_model = {}, {}
    for name in cfg.models:
        model_dir = models_dir / name
        run_info = tracking.read_run_info(model_dir)
        run_id = run_info["run_id"]
        tracking.require_run(client, run_id, str(model_dir / "run.json"))
        if run_info.get("data_sha256") != prepared.fingerprint(meta):
            raise StageError(f"{model_dir}: trained on {run_info.get('dataset')} data "
                             f"{run_info.get('data_sha256')}, but {data_dir} holds "
                             f"{meta['dataset']} data {prepared.fingerprint(meta)}: retrain it")
        results, param_count = {}, None
        for rule in RULES:
            results[rule], param_count = test_model(model_dir, rule, images, labels)
            log.info("%s, %s parameters: test loss %.6f, accuracy %.2f%%", name, rule,
                     results[rule].loss, 100 * results[rule].accuracy)
        per_model[name] = (run_id, results)
        summary[name] = {"param_count": param_count,
                         **{rule: {"loss": ev.loss, "accuracy": ev.accuracy}
                            for rule, ev in results.items()}}

    for name, (run_id, results) in per_model.items():  # tracking first, files last
        track(client, run_id, name, results, f"{meta['dataset']} test ({len(labels)} images)")

    with io.staging_dir(project_path(cfg.paths.evaluation_dir)) as staging:
        for name, (_, results) in per_model.items():
            (staging / name).mkdir()
            io.write_json(staging / name / "details.json", details(results))
            for rule, ev in results.items():
                pd.DataFrame({"actual": labels, "predicted": ev.predictions}).to_csv(
                    staging / name / f"predictions_{rule}.csv", index=False)
    io.write_json(project_path(cfg.paths.metrics_dir) / "test.json", summary)
    log.info("wrote metrics/test.json and %s/", cfg.paths.evaluation_dir)


if __name__ == "__main__":
    main()
