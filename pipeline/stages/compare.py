"""Stage 4: table 19-12 next to ours, with figures, as a report and as an MLflow run.

    python -m pipeline.stages.compare [dataset=fashion_mnist]

Computes the report from its DVC deps only: metrics/<dataset>/ (test.json, train_<name>.json,
history_<name>.csv), evaluation/<dataset>/, the model folders (config.yaml, best.npz's tensors)
and the prepared data's counts; dvc.yaml passes the preset (preset=..., else the training runs'
tag). Writes reports/table_19_12/<dataset>/ (report.md, table.csv, figures) whole. A report run
in the models' experiment holds the same files and links the runs that hold the models'
results in this store (the training runs, or the runs evaluate made for models whose training
run is elsewhere; checked to agree with the files), the page as its description; the
registered versions known here get the alias of their preset (models:/birnn-mnist-bi@book).
"""

from __future__ import annotations

import logging
import math
import re

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from birnn.models import load_model

from pipeline import files
from pipeline.guard.entrypoint import stage
from pipeline.guard.errors import MissingInputError, StageError
from pipeline.metric_names import RULES, test_metric
from pipeline.paths import project_path
from pipeline.reports import figures, formatting, table_19_12
from pipeline.tracking import runs, store

log = logging.getLogger(__name__)

REPORT_FOLDER = "table_19_12"  # reports/table_19_12/<dataset>/
# The name a single training registers its model under (pipeline/stages/train.py's, which a
# stage does not import: tests/test_pipeline.py checks they agree).
REGISTERED_MODEL = "birnn-{dataset}-{name}"
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


def set_aliases(client, registered: dict, alias: str | None) -> None:
    """Point ``alias`` (the preset's) at each compared model's registered version that is known
    here (``registered[name]`` = (registered model, version or None, alias)): the versions
    behind the newest table 19-12 of that preset."""
    if alias is None:
        return
    for name, (model, version, _) in registered.items():
        if version is not None:
            client.set_registered_model_alias(model, alias, str(version))
        else:
            log.warning("%s: no version of %s here holds this model (its training run is not "
                        "in this store): alias %s not moved", name, model, alias)


def describe_training(configs: dict, summaries: dict, meta: dict,
                      found_runs: dict) -> tuple[str, str, str]:
    """The training settings (from the first model's config.yaml and the prepared data's
    counts), and each model's best checkpoint (metrics/<dataset>/train_<name>.json) without
    and with its training time (its run's, which differs on every rerun; left out for a
    model whose training run is not here)."""
    train = next(iter(configs.values()))["train"]
    counts = meta["counts"]
    used = {split: counts[split] if limit is None else min(int(limit), counts[split])
            for split, limit in (("train", train.get("train_limit")),
                                 ("val", train.get("val_limit")))}
    params = {f"train.{key}": str(train[key])
              for key in ("epochs", "batch_size", "checkpoint_every", "dtype")}
    params.update({"data.train_samples": str(used["train"]),
                   "data.val_samples": str(used["val"])})
    training = f"{formatting.training_settings(params)}, seed {train['seed']}"
    best = {name: f"{name}: best checkpoint at epoch {int(summary['best_epoch'])}, "
                  f"iteration {int(summary['best_iteration'])}"
            for name, summary in summaries.items()}
    timed = {}
    for name, text in best.items():
        seconds = found_runs.get(name) and found_runs[name].data.metrics.get("train_seconds")
        timed[name] = text if seconds is None else f"{text}, trained in {seconds:.0f} s"
    return training, "; ".join(best.values()) + ".", "; ".join(timed.values()) + "."


def model_files(cfg: DictConfig, name: str) -> tuple[DictConfig, dict, dict[str, int]]:
    """What the report needs of a model from DVC-tracked files: its config.yaml (checked to be
    of this dataset), its training summary (metrics/<dataset>/train_<name>.json) and its
    parameter count per tensor (from best.npz)."""
    model_dir = project_path(cfg.paths.models_dir) / name
    retrain = retrain_command(cfg.dataset, name)
    path = model_dir / "config.yaml"
    try:
        config = OmegaConf.load(path)
    except FileNotFoundError:
        raise MissingInputError(f"{path}: no such file: train this model first ({retrain})") \
            from None
    except Exception as exc:  # yaml's and OmegaConf's errors
        raise StageError(f"{path}: unreadable ({' '.join(str(exc).split())[:300]}): "
                         f"retrain: {retrain}") from None
    if not isinstance(config, DictConfig) or "train" not in config:
        raise StageError(f"{path}: not a training's config: retrain: {retrain}")
    if config.get("dataset") != cfg.dataset:
        raise StageError(f"{project_path(cfg.paths.models_dir)}: the models were trained on "
                         f"{config.get('dataset')}, not {cfg.dataset} (their config.yaml): "
                         "retrain")
    summary_path = project_path(cfg.paths.metrics_dir) / f"train_{name}.json"
    summary = files.read_json(summary_path, hint=f"retrain: {retrain}",
                              shape={"best_epoch": int, "best_iteration": int})
    weights = model_dir / "best.npz"
    if not weights.is_file():
        raise MissingInputError(f"{weights}: no such file: train this model first ({retrain})")
    try:
        counts = load_model(weights).param_count()
    except Exception as exc:  # a damaged file: numpy's, zipfile's and birnn's errors
        raise StageError(f"{weights}: not a saved model ({' '.join(str(exc).split())[:300]}): "
                         f"retrain: {retrain}") from None
    return config, summary, {key: n for key, n in counts.items() if key != "total"}


def tracked_run(client, cfg: DictConfig, name: str, experiment: str):
    """The run that holds a model's test results in this store, and its run.json: the
    training run run.json names, if run.json describes these weights and the store holds the
    run; else the run evaluate made for these weights (no run.json); else (None, None)."""
    model_dir = project_path(cfg.paths.models_dir) / name
    info, reason = runs.linked_run_info(model_dir)
    if info is not None:
        run, reason = runs.find_run(client, info["run_id"])
        if run is not None:
            return run, info
    evaluated = runs.find_evaluation_run(client, experiment, runs.weights_digest(model_dir),
                                         cfg.dataset)
    if evaluated is None:
        log.warning("%s: %s, and no run in experiment %r records an evaluation of its "
                    "weights: the report run links no run for %s", model_dir, reason,
                    experiment, name)
    return evaluated, None


def collect(cfg: DictConfig, client) -> dict:
    """Everything the report needs about each model, checked for consistency: the page from
    DVC-tracked files only (metrics/<dataset>/, evaluation/<dataset>/, the model folders'
    weights and config.yaml, the prepared data's counts), and the runs that hold the same
    results in this store, where there are any."""
    paths = cfg.paths
    metrics_dir = project_path(paths.metrics_dir)
    test_path = metrics_dir / "test.json"
    test = files.read_json(test_path, hint="rerun evaluate")
    ours, found_runs, run_infos, histories, confusions = {}, {}, {}, {}, {}
    configs, summaries, counts = {}, {}, {}
    for name in cfg.models:
        if name not in test:
            raise StageError(f"{test_path}: no results for model {name!r}: rerun evaluate")
        files.check_shape(test_path, test[name], TEST_RESULT, "rerun evaluate")
        configs[name], summaries[name], counts[name] = model_files(cfg, name)
    experiments = {str(config.get("tracking", {}).get("experiment_name")
                       or cfg.tracking.experiment_name) for config in configs.values()}
    if len(experiments) != 1:
        raise StageError(f"the models {', '.join(configs)} were trained into different MLflow "
                         f"experiments ({', '.join(sorted(experiments))}, their config.yaml): "
                         "train them with one tracking config")
    experiment = experiments.pop()
    for name in cfg.models:
        model_dir = project_path(paths.models_dir) / name
        retrain = retrain_command(cfg.dataset, name)
        run, info = tracked_run(client, cfg, name, experiment)
        if run is not None:
            found_runs[name] = run
            if info is not None:
                run_infos[name] = info
                check_registered(client, info, str(model_dir / "run.json"), retrain)
            check_agreement(name, test[name], run, str(test_path))
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
    trained_on = {run.data.tags.get("dataset") for run in found_runs.values()}
    if trained_on - {cfg.dataset}:
        raise StageError(f"{project_path(paths.models_dir)}: the runs were trained on "
                         f"{', '.join(sorted(map(str, trained_on)))}, not {cfg.dataset}: retrain")
    preset = cfg.preset or next((run.data.tags["preset"] for run in found_runs.values()
                                 if "preset" in run.data.tags), "?")
    meta = files.read_json(project_path(paths.prepared_dir) / "meta.json",
                           shape={"counts": {"train": int, "val": int}})
    alias = alias_of(preset)
    registered = {}  # name -> (registered model, its version here or None, alias)
    for name, config in configs.items():
        if name in run_infos and run_infos[name].get("registered_model"):
            info = run_infos[name]
            registered[name] = (info["registered_model"], int(info["model_version"]), alias)
        elif config.get("register_model") and alias is not None:
            registered[name] = (REGISTERED_MODEL.format(dataset=cfg.dataset, name=name), None,
                                alias)
    return {"ours": ours, "runs": found_runs, "run_infos": run_infos, "histories": histories,
            "confusions": confusions, "configs": configs, "summaries": summaries,
            "tensor_counts": counts, "meta": meta, "registered": registered,
            "experiment": experiment, "preset": preset, "alias": alias,
            "dataset": cfg.dataset}


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
    training, best_checkpoints, best_checkpoints_timed = describe_training(
        found["configs"], found["summaries"], found["meta"], found_runs)
    merge = (found["configs"]["bi"].get("model", {}).get("merge")
             if "bi" in found["configs"] else None)
    notes = table_19_12.notes(book, found["tensor_counts"], merge)
    target = project_path(cfg.paths.reports_dir) / REPORT_FOLDER / cfg.dataset

    tags = {"stage": "compare", "preset": found["preset"], "dataset": found["dataset"]}
    with runs.new_run(client, found["experiment"], cfg.run_name, tags) as report_run_id, \
            files.publish_dir(target, "report") as staging:
        set_aliases(client, found["registered"], found["alias"])
        context = {"runs": {n: r.info.run_id for n, r in found_runs.items()},
                   "report_run": report_run_id, "report_name": cfg.run_name,
                   "training": training, "best_checkpoints": best_checkpoints,
                   "best_checkpoints_timed": best_checkpoints_timed,
                   "models": found["registered"],
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
