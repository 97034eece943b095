"""Stage 3: test the best and the last parameters of every trained model.

    python -m pipeline.stages.evaluate [dataset=fashion_mnist] [models=[uni,bi]]

Computes from its DVC deps only (the prepared data and the model folders: weights and
config.yaml) and writes metrics/<dataset>/test.json (all models, both rules),
evaluation/<dataset>/<name>/details.json (per-class accuracy, confusion matrices) and
metrics/<dataset>/predictions_<name>_<rule>.csv (DVC's confusion plots).

The results are also recorded in MLflow: into the model's own training run when the model
folder's run.json names it, describes these weights and the run is in this store (the best
parameters' results onto its logged model too); otherwise (a model restored by dvc pull, a
queued experiment's copy, an old commit on a new machine) into a run of the same experiment
that names the model by its weights' sha256, made for it once, with one line saying so.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from pipeline import files, prepared_data, scoring
from pipeline.guard.entrypoint import stage
from pipeline.guard.errors import MissingInputError, StageError
from pipeline.metric_names import PER_CLASS_TABLE, TEST_METRICS, test_metric
from pipeline.paths import project_path
from pipeline.reports import figures
from pipeline.tracking import runs, store

log = logging.getLogger(__name__)


def record_into(client, name: str, run_id: str, results: dict, meta: dict, info: dict) -> None:
    """The test results into the model's training run (as run.json names it), onto its
    logged model and its registered version."""
    scoring.record(client, run_id, results, meta, info.get("model_id"))
    registered_model, version = info.get("registered_model"), info.get("model_version")
    if registered_model is not None and version is not None:
        scoring.describe_version(client, registered_model, version, client.get_run(run_id))
    log_confusion(client, run_id, name, results)


def log_confusion(client, run_id: str, name: str, results: dict) -> None:
    for rule, ev in results.items():  # (re)drawn: the figure code may have changed
        client.log_figure(run_id, figures.confusion_matrices(
            {name: ev.confusion}, f"test set, {rule} parameters"),
            f"evaluation/confusion_{rule}.png")


def retrain_command(dataset: str, name: str) -> str:
    # Not `dvc repro train@...`: it retrains only if the model folder changed, and a deleted
    # run leaves it unchanged (run.json is outside its hash).
    return f"python -m pipeline.stages.train dataset={dataset} model={name}"


def model_config(model_dir: Path, dataset: str, name: str) -> DictConfig:
    """The model folder's config.yaml (the training's resolved config, DVC-tracked with the
    weights), checked to be of a model of ``dataset``."""
    path = model_dir / "config.yaml"
    retrain = retrain_command(dataset, name)
    try:
        config = OmegaConf.load(path)
    except FileNotFoundError:
        raise MissingInputError(f"{path}: no such file: train this model first ({retrain})") \
            from None
    except Exception as exc:  # yaml's and OmegaConf's errors
        raise StageError(f"{path}: unreadable ({' '.join(str(exc).split())[:300]}): retrain "
                         f"it ({retrain})") from None
    if not isinstance(config, DictConfig) or config.get("dataset") != dataset:
        trained_on = config.get("dataset") if isinstance(config, DictConfig) else None
        raise StageError(f"{model_dir}: trained on {trained_on} data (its config.yaml), not "
                         f"{dataset}: retrain it ({retrain})")
    return config


@dataclass
class Tracked:
    """Where a model's test results go in MLflow: its training run (``info``: its run.json),
    or, if that is not known here, a run of its own (``reason``: why)."""

    name: str
    model_dir: Path
    results: dict
    run_id: str | None = None
    info: dict | None = None
    reason: str = ""


def tracked_in(client, model_dir: Path, cfg: DictConfig, meta: dict) -> tuple[dict | None, str]:
    """run.json and its training run if both describe these weights and the run is in this
    store; else None and why not. run.json of other data is refused: the model is wrong."""
    info, reason = runs.linked_run_info(model_dir)
    if info is None:
        return None, reason
    if info.get("data_sha256") != prepared_data.fingerprint(meta):
        data_dir = project_path(cfg.paths.prepared_dir)
        raise StageError(f"{model_dir}: trained on {info.get('dataset')} data "
                         f"{info.get('data_sha256')}, but {data_dir} holds "
                         f"{meta['dataset']} data {prepared_data.fingerprint(meta)}: retrain it")
    run, reason = runs.find_run(client, info["run_id"])
    return (info, "") if run is not None else (None, reason)


def evaluation_run(client, tracked: Tracked, cfg: DictConfig, meta: dict):
    """The run that records the evaluation of a model whose training run is not known here:
    the one made for these weights and data before, or a new one in the experiment the model
    was trained into, named as its training run and its weights' digest. Yields its id."""
    config = model_config(tracked.model_dir, cfg.dataset, tracked.name)
    experiment = config.get("tracking", {}).get("experiment_name") or cfg.tracking.experiment_name
    digest = runs.weights_digest(tracked.model_dir)
    data_sha256 = prepared_data.fingerprint(meta)
    where = project_path(cfg.paths.models_dir) / tracked.name
    earlier = runs.find_evaluation_run(client, experiment, digest, cfg.dataset, data_sha256)
    if earlier is not None:
        log.warning("%s: %s; its evaluation is recorded in run %s (%s) of experiment %r, which "
                    "names it by its weights' sha256", where, tracked.reason,
                    earlier.info.run_id, earlier.info.run_name, experiment)
        return contextlib.nullcontext(earlier.info.run_id)
    seed = config.get("train", {}).get("seed", "?")
    run_name = (f"{runs.training_run_name(tracked.name, cfg.dataset, seed)} "
                f"(weights {digest['best.npz'][:12]})")
    tags = {"stage": runs.EVALUATION_STAGE, "dataset": cfg.dataset,
            "model_kind": str(config.get("model", {}).get("kind", tracked.name)),
            "model_name": tracked.name, "seed": str(seed), "data_sha256": data_sha256,
            **runs.weights_tags(digest),
            "training_run": "not in this store: " + tracked.reason}
    params = runs.flatten({key: config[key] for key in ("model", "train") if key in config})
    return _new_evaluation_run(client, experiment, run_name, tags, params, where, tracked.reason)


@contextlib.contextmanager
def _new_evaluation_run(client, experiment: str, run_name: str, tags: dict, params: dict,
                        where: Path, reason: str) -> Iterator[str]:
    with runs.new_run(client, experiment, run_name, tags, script=__file__) as run_id:
        log.warning("%s: %s; recording its evaluation in a new run %s (%s) of experiment %r, "
                    "which names it by its weights' sha256", where, reason, run_id, run_name,
                    experiment)
        runs.log_params(client, run_id, params)
        yield run_id


def describe_evaluation(run, digest: dict) -> str:
    """The description of a run that records only an evaluation."""
    tags, values = run.data.tags, run.data.metrics
    lines = [f"**{run.info.run_name}**: the test results of the {tags.get('model_kind', '?')} "
             f"model of `models/{tags.get('dataset', '?')}/{tags.get('model_name', '?')}/` "
             "whose training run is not in this store (a model restored by DVC: dvc pull, "
             "a queued experiment, an old commit). The model is named by its weights' sha256: "
             + ", ".join(f"`{name}` {value}" for name, value in digest.items()) + "."]
    if all(key in values for key in TEST_METRICS):
        lines.append(f"\n**Test accuracy {100 * values[test_metric('acc', 'best')]:.2f}%** "
                     f"(loss {values[test_metric('loss', 'best')]:.4f}) with the best "
                     f"parameters, {100 * values[test_metric('acc', 'last')]:.2f}% (loss "
                     f"{values[test_metric('loss', 'last')]:.4f}) with the last; per digit: "
                     f"`{PER_CLASS_TABLE}`. Its params are the training's config.yaml.")
    return "\n".join(lines)


def evaluate_task(cfg: DictConfig) -> None:
    client = store.connect(cfg.tracking)
    data_dir = project_path(cfg.paths.prepared_dir)
    meta = prepared_data.read_meta(data_dir, cfg.dataset)
    images, labels = prepared_data.load(data_dir, "test", meta)
    models_dir = project_path(cfg.paths.models_dir)

    summary, per_model = {}, {}
    for name in cfg.models:
        model_dir = models_dir / name
        info, reason = tracked_in(client, model_dir, cfg, meta)
        models = scoring.load_rules(model_dir, retrain_command(cfg.dataset, name))
        if info is None:  # the model folder's config.yaml says what it is
            model_config(model_dir, cfg.dataset, name)
        results = scoring.score(name, models, images, labels)
        per_model[name] = Tracked(name, model_dir, results, info and info["run_id"], info,
                                  reason)
        summary[name] = scoring.summary_entry(models["best"].param_count()["total"], results)

    for name, tracked in per_model.items():  # tracking first, files last
        if tracked.info is not None:
            record_into(client, name, tracked.run_id, tracked.results, meta, tracked.info)
            continue
        with evaluation_run(client, tracked, cfg, meta) as run_id:
            if scoring.record(client, run_id, tracked.results, meta):
                runs.set_description(client, run_id, describe_evaluation(
                    client.get_run(run_id), runs.weights_digest(tracked.model_dir)))
                log_confusion(client, run_id, name, tracked.results)

    metrics_dir = project_path(cfg.paths.metrics_dir)
    with files.publish_dir(project_path(cfg.paths.evaluation_dir), "evaluation") as staging:
        for name, tracked in per_model.items():
            (staging / name).mkdir()
            files.write_json(staging / name / "details.json", scoring.details(tracked.results))
    for name, tracked in per_model.items():
        for rule, ev in tracked.results.items():
            files.write_text(metrics_dir / f"predictions_{name}_{rule}.csv",
                             pd.DataFrame({"actual": labels, "predicted": ev.predictions})
                             .to_csv(index=False))
    files.write_json(metrics_dir / "test.json", summary)
    log.info("wrote %s/test.json and %s/", metrics_dir, cfg.paths.evaluation_dir)


main = stage("evaluate")(evaluate_task)

if __name__ == "__main__":
    main()
