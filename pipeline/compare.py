"""Stage 4: table 19-12 next to ours, with figures, as a report and as an MLflow run.

    python -m pipeline.compare

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

from pipeline import figures, io, report, tracking
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


@stage("compare")
def main(cfg: DictConfig) -> None:
    client = tracking.connect(cfg.tracking)
    paths = cfg.paths
    book = report.load_book(project_path(paths.book_numbers))
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
    experiment = client.get_experiment(experiments.pop()).name
    preset = next(iter(runs.values())).data.tags.get("preset", "?")
    dataset = next(iter(runs.values())).data.tags.get("dataset", "?")

    table = report.build_table(book, ours)
    training, best_checkpoints = describe_training(runs)
    merge = runs["bi"].data.params.get("model.merge") if "bi" in runs else None
    notes_text = report.notes(book, {n: tensor_counts(r) for n, r in runs.items()}, merge)
    reports_dir = project_path(paths.reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)

    tags = {"stage": "compare", "preset": preset, "dataset": dataset}
    with tracking.run(client, experiment, cfg.run_name, tags) as report_run_id, \
            tempfile.TemporaryDirectory(prefix=".compare.", dir=reports_dir) as tmp:
        context = {"runs": {n: r.info.run_id for n, r in runs.items()}, "preset": preset,
                   "experiment": experiment, "report_run": report_run_id, "dataset": dataset,
                   "training": training, "best_checkpoints": best_checkpoints}
        staging = Path(tmp)
        write_report_files(staging, table, report.page(table, book, context, notes_text),
                           histories, confusions)
        client.log_artifacts(report_run_id, str(staging))
        tracking.log_metrics(client, report_run_id, {
            f"{name}.{key}": value for name in ours for key, value in (
                ("param_count", ours[name]["param_count"]),
                *((f"test_{k[:3] if k == 'accuracy' else k}_{rule}", ours[name][rule][k])
                  for rule in report.RULES for k in ("accuracy", "loss")))})
        tracking.adopt_children(client, report_run_id, [r.info.run_id for r in runs.values()])
        # Publish: the figures folder is swapped whole, the two files renamed into place.
        io.replace_dir(staging / "figures", reports_dir / "figures")
        for name in ("table_19_12.csv", "table_19_12.md"):
            os.replace(staging / name, reports_dir / name)
    log.info("wrote %s/table_19_12.md (report run %s)", reports_dir, report_run_id)
    print(report.table_markdown(table))


if __name__ == "__main__":
    main()
