"""Stage 4: table 19-12 next to ours, with figures, as a report and as an MLflow run.

    python -m pipeline.compare
    python -m pipeline.compare sweep=<id>     the multi-seed report of a sweep: pipeline.compare_sweep

Reads metrics/test.json and the training runs (MLflow) and writes

    reports/table_19_12.md, reports/table_19_12.csv
    reports/figures/validation_curves.png, reports/figures/confusion_matrices.png

It checks that metrics/test.json and the runs' test metrics agree, creates a report run in the
training runs' experiment and nests the compared runs under it (see pipeline.tracking).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from pipeline import compare_sweep, figures, io, report, tracking
from pipeline.cli import StageError, stage
from pipeline.paths import project_path

log = logging.getLogger(__name__)


def check_agreement(name: str, ours: dict, run, where: str) -> None:
    """metrics/test.json must hold what the run has: else files and store are out of sync."""
    for rule in report.RULES:
        for key, metric in (("accuracy", f"test_acc_{rule}"), ("loss", f"test_loss_{rule}")):
            tracked = run.data.metrics.get(metric)
            if tracked is None or not math.isclose(tracked, ours[rule][key], rel_tol=1e-12):
                raise StageError(f"{where}: {name}.{rule}.{key} = {ours[rule][key]} but run "
                                 f"{run.info.run_id} has {metric} = {tracked}: rerun evaluate")


def tensor_counts(run) -> dict[str, int]:
    prefix = "param_count."
    return {key[len(prefix):]: int(value) for key, value in run.data.params.items()
            if key.startswith(prefix)}


def describe_training(runs: dict) -> tuple[str, str]:
    any_run = next(iter(runs.values()))
    params = any_run.data.params
    training = (f"{params['train.epochs']} epochs, batch {params['train.batch_size']}, "
                f"checkpoint every {params['train.checkpoint_every']} epoch, "
                f"{params['data.train_samples']} training / {params['data.val_samples']} "
                f"validation samples, seed {params['train.seed']}, {params['train.dtype']}")
    best = "; ".join(
        f"{name}: best checkpoint at epoch {int(run.data.metrics['best_epoch'])}, iteration "
        f"{int(run.data.metrics['best_iteration'])}, trained in "
        f"{run.data.metrics['train_seconds']:.0f} s"
        for name, run in runs.items())
    return training, best + "."


def write_report_files(folder: Path, table: pd.DataFrame, page: str, histories: dict,
                       confusions: dict) -> None:
    (folder / "figures").mkdir()
    figures.save_png(figures.validation_curves(histories), folder / "figures" / "validation_curves.png")
    figures.save_png(figures.confusion_matrices(confusions, "test set, best parameters"),
                     folder / "figures" / "confusion_matrices.png")
    table.to_csv(folder / "table_19_12.csv", index=False)
    (folder / "table_19_12.md").write_text(page, encoding="utf-8")


def collect(cfg: DictConfig, client) -> dict:
    """Everything the report needs about each model, checked for consistency."""
    paths = cfg.paths
    test_path = project_path(paths.metrics_dir) / "test.json"
    test = io.read_json(test_path)
    ours, runs, histories, confusions = {}, {}, {}, {}
    for name in cfg.models:
        if name not in test:
            raise StageError(f"{test_path}: no results for model {name!r}: rerun evaluate")
        model_dir = project_path(paths.models_dir) / name
        run_id = tracking.read_run_info(model_dir)["run_id"]
        runs[name] = tracking.require_run(client, run_id, str(model_dir / "run.json"))
        check_agreement(name, test[name], runs[name], str(test_path))
        ours[name] = test[name]
        label = f"{name} ({test[name]['param_count']} parameters)"
        histories[label] = pd.read_csv(model_dir / "history.csv")
        details = io.read_json(project_path(paths.evaluation_dir) / name / "details.json")
        confusions[label] = details["best"]["confusion"]
    experiments = {run.info.experiment_id for run in runs.values()}
    if len(experiments) != 1:
        raise StageError(f"the runs of {', '.join(runs)} are in different MLflow experiments "
                         f"({', '.join(sorted(experiments))}): train them with one tracking config")
    first = next(iter(runs.values()))
    return {"ours": ours, "runs": runs, "histories": histories, "confusions": confusions,
            "experiment": client.get_experiment(experiments.pop()).name,
            "preset": first.data.tags.get("preset", "?"),
            "dataset": first.data.tags.get("dataset", "?")}


def report_run_metrics(ours: dict) -> dict[str, float]:
    """Our column of the table as metrics of the report run: uni.test_acc_best, ..."""
    metrics = {}
    for name, result in ours.items():
        metrics[f"{name}.param_count"] = result["param_count"]
        for rule in report.RULES:
            metrics[f"{name}.test_acc_{rule}"] = result[rule]["accuracy"]
            metrics[f"{name}.test_loss_{rule}"] = result[rule]["loss"]
    return metrics


@stage("compare")
def main(cfg: DictConfig) -> None:
    client = tracking.connect(cfg.tracking)
    if cfg.sweep is not None:
        compare_sweep.main(cfg, client)
        return
    book = report.load_book(project_path(cfg.paths.book_numbers))
    found = collect(cfg, client)
    runs = found["runs"]
    table = report.build_table(book, found["ours"])
    training, best_checkpoints = describe_training(runs)
    merge = runs["bi"].data.params.get("model.merge") if "bi" in runs else None
    notes_text = report.notes(book, {n: tensor_counts(r) for n, r in runs.items()}, merge)
    reports_dir = project_path(cfg.paths.reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)

    tags = {"stage": "compare", "preset": found["preset"], "dataset": found["dataset"]}
    with tracking.run(client, found["experiment"], cfg.run_name, tags) as report_run_id, \
            tempfile.TemporaryDirectory(prefix=".compare.", dir=reports_dir) as tmp:
        context = {"runs": {n: r.info.run_id for n, r in runs.items()},
                   "report_run": report_run_id, "training": training,
                   "best_checkpoints": best_checkpoints,
                   **{key: found[key] for key in ("preset", "dataset", "experiment")}}
        staging = Path(tmp)
        write_report_files(staging, table, report.page(table, book, context, notes_text),
                           found["histories"], found["confusions"])
        client.log_artifacts(report_run_id, str(staging))
        tracking.log_metrics(client, report_run_id, report_run_metrics(found["ours"]))
        tracking.adopt_children(client, report_run_id, [r.info.run_id for r in runs.values()])
        # Publish: the figures folder is swapped whole, the two files renamed into place.
        io.replace_dir(staging / "figures", reports_dir / "figures")
        for name in ("table_19_12.csv", "table_19_12.md"):
            os.replace(staging / name, reports_dir / name)
    log.info("wrote %s/table_19_12.md (report run %s)", reports_dir, report_run_id)
    print(report.table_markdown(table))


if __name__ == "__main__":
    main()
