"""Stage 3: test the best and the last parameters of every trained model.

    python -m pipeline.stages.evaluate [dataset=fashion_mnist] [models=[uni,bi]]

Results go into each model's own training run (its id is in models/<dataset>/<name>/run.json;
the best parameters' results onto its logged MLflow model too) and into
metrics/<dataset>/test.json (all models, both rules), evaluation/<dataset>/<name>/details.json
(per-class accuracy, confusion matrices) and metrics/<dataset>/predictions_<name>_<rule>.csv
(DVC's confusion plots).
"""

from __future__ import annotations

import logging

import pandas as pd
from omegaconf import DictConfig

from pipeline import files, prepared_data, scoring
from pipeline.guard.entrypoint import stage
from pipeline.guard.errors import StageError
from pipeline.paths import project_path
from pipeline.reports import figures
from pipeline.tracking import runs, store

log = logging.getLogger(__name__)


def retrain_command(dataset: str, name: str) -> str:
    # Not `dvc repro train@...`: it retrains only if the model folder changed, and a deleted
    # run leaves it unchanged (run.json is outside its hash).
    return f"python -m pipeline.stages.train dataset={dataset} model={name}"


def evaluate_task(cfg: DictConfig) -> None:
    client = store.connect(cfg.tracking)
    data_dir = project_path(cfg.paths.prepared_dir)
    meta = prepared_data.read_meta(data_dir, cfg.dataset)
    images, labels = prepared_data.load(data_dir, "test", meta)
    models_dir = project_path(cfg.paths.models_dir)

    summary, per_model, registered = {}, {}, {}
    for name in cfg.models:
        model_dir = models_dir / name
        run_info = runs.read_run_info(model_dir, cfg.dataset)
        run_id = run_info["run_id"]
        runs.require_run(client, run_id, str(model_dir / "run.json"),
                         f"retrain it ({retrain_command(cfg.dataset, name)})")
        if run_info.get("data_sha256") != prepared_data.fingerprint(meta):
            raise StageError(f"{model_dir}: trained on {run_info.get('dataset')} data "
                             f"{run_info.get('data_sha256')}, but {data_dir} holds "
                             f"{meta['dataset']} data {prepared_data.fingerprint(meta)}: retrain it")
        models = scoring.load_rules(model_dir, retrain_command(cfg.dataset, name))
        results = scoring.score(name, models, images, labels)
        per_model[name] = (run_id, run_info.get("model_id"), results)
        registered[name] = (run_info.get("registered_model"), run_info.get("model_version"))
        summary[name] = scoring.summary_entry(models["best"].param_count()["total"], results)

    for name, (run_id, model_id, results) in per_model.items():  # tracking first, files last
        scoring.record(client, run_id, results, meta, model_id)
        registered_model, version = registered[name]
        if registered_model is not None and version is not None:
            scoring.describe_version(client, registered_model, version, client.get_run(run_id))
        for rule, ev in results.items():  # (re)drawn: the figure code may have changed
            client.log_figure(run_id, figures.confusion_matrices(
                {name: ev.confusion}, f"test set, {rule} parameters"),
                f"evaluation/confusion_{rule}.png")

    metrics_dir = project_path(cfg.paths.metrics_dir)
    with files.publish_dir(project_path(cfg.paths.evaluation_dir), "evaluation") as staging:
        for name, (_, _, results) in per_model.items():
            (staging / name).mkdir()
            files.write_json(staging / name / "details.json", scoring.details(results))
    for name, (_, _, results) in per_model.items():
        for rule, ev in results.items():
            files.write_text(metrics_dir / f"predictions_{name}_{rule}.csv",
                             pd.DataFrame({"actual": labels, "predicted": ev.predictions})
                             .to_csv(index=False))
    files.write_json(metrics_dir / "test.json", summary)
    log.info("wrote %s/test.json and %s/", metrics_dir, cfg.paths.evaluation_dir)


main = stage("evaluate")(evaluate_task)

if __name__ == "__main__":
    main()
