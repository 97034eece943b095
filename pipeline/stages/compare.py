"""Stage 4: table 19-12 next to ours, with figures, as a report and as an MLflow run.

    python -m pipeline.stages.compare [dataset=fashion_mnist]

Reads metrics/<dataset>/ (test.json, history_<name>.csv), evaluation/<dataset>/ and the
training runs, checks that files and runs agree, and writes reports/table_19_12/<dataset>/
(report.md, table.csv, figures) whole. A report run in the training runs' experiment holds the
same files, with the runs nested under it and the page as its description; the registered
versions it compared get the alias of their preset (models:/birnn-mnist-bi@book).
"""

from __future__ import annotations

import json
import logging
import math
import re

import pandas as pd
from omegaconf import DictConfig

from pipeline import files
from pipeline.guard.entrypoint import stage
from pipeline.guard.errors import StageError
from pipeline.metric_names import RULES, test_metric
from pipeline.paths import project_path
from pipeline.reports import figures, formatting, table_19_12
from pipeline.tracking import runs, store

log = logging.getLogger(__name__)

REPORT_FOLDER = "table_19_12"  # reports/table_19_12/<dataset>/
# One model's entry of metrics/<dataset>/test.json (written by the evaluate stage).
TEST_RESULT = {"param_count": int, **{rule: {"loss": files.NUMBER, "accuracy": files.NUMBER}
                                      for rule in RULES}}


def check_agreement(name: str, ours: dict, run, where: str) -> None:
    """metrics/<dataset>/test.json must hold what the run has: else files and store are out of sync."""
    for rule in RULES:
        for key, metric in (("accuracy", test_metric("acc", rule)),
                            ("loss", test_metric("loss", rule))):
            tracked = run.data.metrics.get(metric)
            if tracked is None or not math.isclose(tracked, ours[rule][key], rel_tol=1e-12):
                raise StageError(f"{where}: {name}.{rule}.{key} = {ours[rule][key]} but run "
                                 f"{run.info.run_id} has {metric} = {tracked}: rerun evaluate")


def tensor_counts(run) -> dict[str, int]:
    params = run.data.params
    if "param_count_by_tensor" in params:
        return {key: int(n) for key, n in json.loads(params["param_count_by_tensor"]).items()}
    prefix = "param_count."  # runs logged before param_count_by_tensor
    return {key[len(prefix):]: int(value) for key, value in params.items()
            if key.startswith(prefix)}


def alias_of(preset: str) -> str | None:
    """The registry alias for a preset ('book'), or None if MLflow would refuse the name."""
    if re.fullmatch(r"[\w-]+", preset) and preset.lower() != "latest" \
            and not re.fullmatch(r"v\d+", preset):
        return preset
    return None


def retrain_command(dataset: str, name: str) -> str:
    """Retraining registers a new version; evaluate then records its results into the new run."""
    return (f"python -m pipeline.stages.train dataset={dataset} model={name}, then python -m "
            f"pipeline.stages.evaluate dataset={dataset} and python -m pipeline.stages.compare "
            f"dataset={dataset}")


def check_registered(client, info: dict, where: str, retrain: str) -> None:
    """The registered version run.json names exists and holds this run's model. Checked for
    every model before any alias moves: a failure halfway would leave the preset's alias on
    one model of this table and one of an older table."""
    from mlflow.exceptions import MlflowException

    if not info.get("registered_model"):
        return  # trained before models were registered
    name, version = info["registered_model"], str(info["model_version"])
    try:
        holds = client.get_model_version(name, version).run_id
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise StageError(f"{where}: registered model {name} version {version} is not in "
                         f"tracking store {client.tracking_uri} (deleted?): retrain to register "
                         f"a new version: {retrain}") from None
    if holds != info["run_id"]:
        raise StageError(f"{where}: registered model {name} version {version} holds run "
                         f"{holds}'s model, not run {info['run_id']}'s (the model was deleted "
                         f"and registered again?): retrain to register a new version: {retrain}")


def set_aliases(client, found_runs: dict, run_infos: dict) -> dict:
    """Point the alias of each compared run's preset at its registered version: the versions
    behind the newest table 19-12 of that preset. Returns name -> (model, version, alias)."""
    models = {}
    for name, info in run_infos.items():
        if not info.get("registered_model"):
            continue  # trained before models were registered
        registered, version = info["registered_model"], int(info["model_version"])
        alias = alias_of(found_runs[name].data.tags.get("preset", ""))
        if alias is not None:
            client.set_registered_model_alias(registered, alias, str(version))
        models[name] = (registered, version, alias)
    return models


def describe_training(runs_by_name: dict) -> tuple[str, str, str]:
    """The training settings, and each run's best checkpoint without and with its training
    time (which differs on every rerun)."""
    params = next(iter(runs_by_name.values())).data.params
    training = f"{formatting.training_settings(params)}, seed {params['train.seed']}"
    best = {name: f"{name}: best checkpoint at epoch {int(run.data.metrics['best_epoch'])}, "
                  f"iteration {int(run.data.metrics['best_iteration'])}"
            for name, run in runs_by_name.items()}
    timed = {name: f"{text}, trained in {runs_by_name[name].data.metrics['train_seconds']:.0f} s"
             for name, text in best.items()}
    return training, "; ".join(best.values()) + ".", "; ".join(timed.values()) + "."


def collect(cfg: DictConfig, client) -> dict:
    """Everything the report needs about each model, checked for consistency."""
    paths = cfg.paths
    metrics_dir = project_path(paths.metrics_dir)
    test_path = metrics_dir / "test.json"
    test = files.read_json(test_path, hint="rerun evaluate")
    ours, found_runs, run_infos, histories, confusions = {}, {}, {}, {}, {}
    for name in cfg.models:
        if name not in test:
            raise StageError(f"{test_path}: no results for model {name!r}: rerun evaluate")
        files.check_shape(test_path, test[name], TEST_RESULT, "rerun evaluate")
        model_dir = project_path(paths.models_dir) / name
        run_infos[name] = runs.read_run_info(model_dir, cfg.dataset)
        retrain = retrain_command(cfg.dataset, name)
        found_runs[name] = runs.require_run(client, run_infos[name]["run_id"],
                                            str(model_dir / "run.json"), f"retrain it: {retrain}")
        check_registered(client, run_infos[name], str(model_dir / "run.json"), retrain)
        check_agreement(name, test[name], found_runs[name], str(test_path))
        ours[name] = test[name]
        label = f"{name} ({test[name]['param_count']} parameters)"
        history_path = metrics_dir / f"history_{name}.csv"
        try:
            histories[label] = pd.read_csv(history_path)
        except (OSError, ValueError) as exc:
            raise StageError(f"{history_path}: unreadable ({exc}): retrain {name}") from None
        details = files.read_json(project_path(paths.evaluation_dir) / name / "details.json",
                                  hint="rerun evaluate", shape={"best": {"confusion": list}})
        confusions[label] = details["best"]["confusion"]
    experiments = {run.info.experiment_id for run in found_runs.values()}
    if len(experiments) != 1:
        raise StageError(f"the runs of {', '.join(found_runs)} are in different MLflow "
                         f"experiments ({', '.join(sorted(experiments))}): train them with one "
                         "tracking config")
    first = next(iter(found_runs.values()))
    trained_on = {run.data.tags.get("dataset") for run in found_runs.values()}
    if trained_on != {cfg.dataset}:
        raise StageError(f"{project_path(paths.models_dir)}: the runs were trained on "
                         f"{', '.join(sorted(map(str, trained_on)))}, not {cfg.dataset}: retrain")
    return {"ours": ours, "runs": found_runs, "run_infos": run_infos, "histories": histories,
            "confusions": confusions,
            "experiment": client.get_experiment(experiments.pop()).name,
            "preset": first.data.tags.get("preset", "?"),
            "dataset": first.data.tags.get("dataset", "?")}


def runs_page_url(client, experiment: str, base: str = "http://127.0.0.1:5000") -> str:
    """The UI's page of the experiment's runs, in the model-training workflow (MLflow 3.17
    opens an experiment on its GenAI pages unless told)."""
    experiment_id = store.experiment_id(client, experiment)
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def compare_task(cfg: DictConfig) -> None:
    client = store.connect(cfg.tracking)
    book = table_19_12.load_book(project_path(cfg.paths.book_numbers))
    found = collect(cfg, client)
    found_runs = found["runs"]
    table = table_19_12.build_table(book, found["ours"])
    training, best_checkpoints, best_checkpoints_timed = describe_training(found_runs)
    merge = found_runs["bi"].data.params.get("model.merge") if "bi" in found_runs else None
    notes = table_19_12.notes(book, {n: tensor_counts(r) for n, r in found_runs.items()}, merge)
    target = project_path(cfg.paths.reports_dir) / REPORT_FOLDER / cfg.dataset

    tags = {"stage": "compare", "preset": found["preset"], "dataset": found["dataset"]}
    with runs.new_run(client, found["experiment"], cfg.run_name, tags) as report_run_id, \
            files.publish_dir(target, "report") as staging:
        context = {"runs": {n: r.info.run_id for n, r in found_runs.items()},
                   "report_run": report_run_id, "report_name": cfg.run_name,
                   "training": training, "best_checkpoints": best_checkpoints,
                   "best_checkpoints_timed": best_checkpoints_timed,
                   "models": set_aliases(client, found_runs, found["run_infos"]),
                   **{key: found[key] for key in ("preset", "dataset", "experiment")}}
        figures.save_png(figures.validation_curves(found["histories"]),
                         staging / "validation_curves.png")
        figures.save_png(figures.confusion_matrices(found["confusions"],
                                                    "test set, best parameters"),
                         staging / "confusion_matrices.png")
        table.to_csv(staging / "table.csv", index=False)
        (staging / "report.md").write_text(table_19_12.page(table, book, context, notes),
                                           encoding="utf-8")
        client.log_artifacts(report_run_id, str(staging))
        # The run's page shows the report, its figures fetched from the run's artifacts (a
        # URL relative to the UI, as the UI's own artifact viewer uses). No metrics: the
        # numbers are the training runs' own.
        runs.set_description(client, report_run_id, table_19_12.page(
            table, book, context, notes,
            figure_link=lambda f: f"get-artifact?path={f}&run_uuid={report_run_id}", ids=True))
        runs.link_report(client, report_run_id, [r.info.run_id for r in found_runs.values()])
    log.info("wrote %s/report.md (report run %s)", target, report_run_id)
    print(table_19_12.table_markdown(table))


main = stage("compare")(compare_task)

if __name__ == "__main__":
    main()
