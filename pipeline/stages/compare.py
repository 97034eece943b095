"""Stage 4: table 19-12 next to ours, with figures, as a report and as an MLflow run.

    python -m pipeline.stages.compare

Reads metrics/ (test.json, history_<name>.csv), evaluation/ and the training runs, checks that
files and runs agree, and writes reports/table_19_12/ (report.md, table.csv, figures) whole.
A report run in the training runs' experiment holds the same files, with the runs nested under it.
"""

from __future__ import annotations

import logging
import math

import pandas as pd
from omegaconf import DictConfig

from pipeline import files
from pipeline.entrypoint import stage
from pipeline.errors import StageError
from pipeline.metric_names import RULES, test_metric
from pipeline.paths import project_path
from pipeline.reports import figures, formatting, table_19_12
from pipeline.tracking import metrics, runs, store

log = logging.getLogger(__name__)

REPORT_FOLDER = "table_19_12"


def check_agreement(name: str, ours: dict, run, where: str) -> None:
    """metrics/test.json must hold what the run has: else files and store are out of sync."""
    for rule in RULES:
        for key, metric in (("accuracy", test_metric("acc", rule)),
                            ("loss", test_metric("loss", rule))):
            tracked = run.data.metrics.get(metric)
            if tracked is None or not math.isclose(tracked, ours[rule][key], rel_tol=1e-12):
                raise StageError(f"{where}: {name}.{rule}.{key} = {ours[rule][key]} but run "
                                 f"{run.info.run_id} has {metric} = {tracked}: rerun evaluate")


def tensor_counts(run) -> dict[str, int]:
    prefix = "param_count."
    return {key[len(prefix):]: int(value) for key, value in run.data.params.items()
            if key.startswith(prefix)}


def describe_training(runs_by_name: dict) -> tuple[str, str]:
    params = next(iter(runs_by_name.values())).data.params
    training = f"{formatting.training_settings(params)}, seed {params['train.seed']}"
    best = "; ".join(
        f"{name}: best checkpoint at epoch {int(run.data.metrics['best_epoch'])}, iteration "
        f"{int(run.data.metrics['best_iteration'])}, trained in "
        f"{run.data.metrics['train_seconds']:.0f} s"
        for name, run in runs_by_name.items())
    return training, best + "."


def collect(cfg: DictConfig, client) -> dict:
    """Everything the report needs about each model, checked for consistency."""
    paths = cfg.paths
    metrics_dir = project_path(paths.metrics_dir)
    test_path = metrics_dir / "test.json"
    test = files.read_json(test_path)
    ours, found_runs, histories, confusions = {}, {}, {}, {}
    for name in cfg.models:
        if name not in test:
            raise StageError(f"{test_path}: no results for model {name!r}: rerun evaluate")
        model_dir = project_path(paths.models_dir) / name
        run_id = runs.read_run_info(model_dir)["run_id"]
        found_runs[name] = runs.require_run(client, run_id, str(model_dir / "run.json"))
        check_agreement(name, test[name], found_runs[name], str(test_path))
        ours[name] = test[name]
        label = f"{name} ({test[name]['param_count']} parameters)"
        history_path = metrics_dir / f"history_{name}.csv"
        try:
            histories[label] = pd.read_csv(history_path)
        except (OSError, ValueError) as exc:
            raise StageError(f"{history_path}: unreadable ({exc}): retrain {name}") from None
        details = files.read_json(project_path(paths.evaluation_dir) / name / "details.json")
        confusions[label] = details["best"]["confusion"]
    experiments = {run.info.experiment_id for run in found_runs.values()}
    if len(experiments) != 1:
        raise StageError(f"the runs of {', '.join(found_runs)} are in different MLflow "
                         f"experiments ({', '.join(sorted(experiments))}): train them with one "
                         "tracking config")
    first = next(iter(found_runs.values()))
    return {"ours": ours, "runs": found_runs, "histories": histories, "confusions": confusions,
            "experiment": client.get_experiment(experiments.pop()).name,
            "preset": first.data.tags.get("preset", "?"),
            "dataset": first.data.tags.get("dataset", "?")}


def report_run_metrics(ours: dict) -> dict[str, float]:
    """Our column of the table as metrics of the report run: uni.test_acc_best, ..."""
    values = {}
    for name, result in ours.items():
        values[f"{name}.param_count"] = result["param_count"]
        for rule in RULES:
            values[f"{name}.{test_metric('acc', rule)}"] = result[rule]["accuracy"]
            values[f"{name}.{test_metric('loss', rule)}"] = result[rule]["loss"]
    return values


def compare_task(cfg: DictConfig) -> None:
    client = store.connect(cfg.tracking)
    book = table_19_12.load_book(project_path(cfg.paths.book_numbers))
    found = collect(cfg, client)
    found_runs = found["runs"]
    table = table_19_12.build_table(book, found["ours"])
    training, best_checkpoints = describe_training(found_runs)
    merge = found_runs["bi"].data.params.get("model.merge") if "bi" in found_runs else None
    notes = table_19_12.notes(book, {n: tensor_counts(r) for n, r in found_runs.items()}, merge)
    target = project_path(cfg.paths.reports_dir) / REPORT_FOLDER

    tags = {"stage": "compare", "preset": found["preset"], "dataset": found["dataset"]}
    with runs.new_run(client, found["experiment"], cfg.run_name, tags) as report_run_id, \
            files.publish_dir(target) as staging:
        context = {"runs": {n: r.info.run_id for n, r in found_runs.items()},
                   "report_run": report_run_id, "training": training,
                   "best_checkpoints": best_checkpoints,
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
        metrics.log_metrics(client, report_run_id, report_run_metrics(found["ours"]))
        runs.adopt_children(client, report_run_id, [r.info.run_id for r in found_runs.values()])
    log.info("wrote %s/report.md (report run %s)", target, report_run_id)
    print(table_19_12.table_markdown(table))


main = stage("compare")(compare_task)

if __name__ == "__main__":
    main()
