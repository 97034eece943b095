"""Stage 2: train one model and track it in MLflow; with -m, a sweep of them.

    python -m pipeline.stages.train model=uni|bi [dataset=fashion_mnist] [experiment=quick]
    python -m pipeline.stages.train -m model=uni,bi 'train.seed=range(5)' hydra/launcher=joblib

Load, train, publish, track: writes models/<dataset>/<name>/ (best.npz, last.npz, config.yaml,
run.json), metrics/<dataset>/train_<name>.json and history_<name>.csv once training succeeded,
then tracks them. A single run and a sweep job run the same code; what differs is configuration
(conf/train.yaml): a single run registers its model as birnn-<dataset>-<name>; a sweep job
writes under its own folder (<sweep dir>/<job>/), registers nothing and tests its model before
its run ends. The task returns the best validation loss: the objective of a Hydra sweeper.
"""

from __future__ import annotations

import copy
import json
import logging
import shlex
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from birnn.models import RNNClassifier, build_model
from birnn.training import LRSchedule, TrainResult, TrainSettings, train
from pipeline import files, prepared_data, schema, scoring
from pipeline.guard import locks
from pipeline.guard.entrypoint import stage
from pipeline.metric_names import CHECKPOINT_METRICS, CHECKPOINT_RENAMES, SUMMARY_METRICS
from pipeline.paths import portable, project_path
from pipeline.sweeps import job as sweep_job
from pipeline.sweeps import predictions as sweep_predictions
from pipeline.tracking import logged_model, metrics, runs, store

log = logging.getLogger(__name__)

ARCHITECTURE_KEYS = {"uni": ("hidden_size",), "bi": ("hidden_fwd", "hidden_bwd", "merge")}
CHAIN_KEYS = {"uni": ("hidden_size",), "bi": ("hidden_fwd", "hidden_bwd")}
REGISTERED_MODEL = "birnn-{dataset}-{name}"   # single runs register their model under this name
MODEL_DESCRIPTIONS = {
    "uni": "Unidirectional vanilla RNN (tanh) of table 19-12, numpy: reads a 28 x 28 image "
           "row by row, classifies from its last state.",
    "bi": "Bidirectional vanilla RNN (tanh) of table 19-12, numpy: a forward and a reversed chain "
          "read a 28 x 28 image row by row; their final states are merged, then classified.",
}


def make_model(cfg: DictConfig) -> RNNClassifier:
    sizes = {key: cfg.model[key] for key in ARCHITECTURE_KEYS[cfg.model.kind]}
    return build_model(cfg.model.kind, seed=cfg.train.seed, dtype=cfg.train.dtype, **sizes)


def make_settings(cfg: DictConfig) -> TrainSettings:
    schedule = LRSchedule(cfg.model.lr, schema.lr_milestones(cfg.model, cfg.train.epochs))
    return TrainSettings(epochs=cfg.train.epochs, batch_size=cfg.train.batch_size, lr=schedule,
                         checkpoint_every=cfg.train.checkpoint_every, seed=cfg.train.seed)


def run_tags(cfg: DictConfig, meta: dict) -> dict[str, str]:
    hydra = HydraConfig.get()
    return {
        "stage": "train",
        "model_kind": cfg.model.kind,
        "seed": str(cfg.train.seed),
        "preset": str(hydra.runtime.choices.get("experiment")),
        "dataset": meta["dataset"],
        "data_sha256": prepared_data.fingerprint(meta),
        "hydra_overrides": json.dumps(list(hydra.overrides.task)),
    }


def run_params(cfg: DictConfig, counts: dict[str, int], n_train: int, n_val: int) -> dict:
    """What was trained, under the same names for both models so that MLflow's Compare view
    lines them up: the parameter count, the hidden units in total and per chain, the learning
    rate and its schedule, the merge (bi only), the training settings and the samples used.
    Settings that do not change the result (paths, tracking) and unset limits are left out;
    the whole resolved config is the run's config.yaml."""
    chains = [int(cfg.model[key]) for key in CHAIN_KEYS[cfg.model.kind]]
    # The milestones in effect: those lr_decay_every derives for this run's length, if set.
    milestones = {str(epoch): lr for epoch, lr
                  in schema.lr_milestones(cfg.model, cfg.train.epochs).items()}
    steps = {f"model.{key}": cfg.model[key] for key in ("lr_decay", "lr_decay_every")
             if cfg.model.get("lr_decay_every") is not None}
    return {"model.kind": cfg.model.kind, "param_count": counts["total"], "dataset": cfg.dataset,
            "param_count_by_tensor": json.dumps({k: n for k, n in counts.items() if k != "total"}),
            "hidden_units": sum(chains), "hidden_sizes": "+".join(map(str, chains)),
            "model.lr": cfg.model.lr, "model.lr_milestones": json.dumps(milestones), **steps,
            **({"model.merge": cfg.model.merge} if "merge" in cfg.model else {}),
            **{f"train.{key}": value for key, value in cfg.train.items() if value is not None},
            "data.train_samples": n_train, "data.val_samples": n_val}


def summarize(result: TrainResult, param_count: int) -> dict:
    """metrics/<dataset>/train_<name>.json, also logged as run metrics (with the training
    time, which is kept out of the file: a rerun with the same numbers leaves it unchanged)."""
    return {"best_val_loss": result.best.val_loss, "best_val_acc": result.best.val_acc,
            "best_epoch": result.best.epoch, "best_iteration": result.best.iteration,
            "last_val_loss": result.history[-1].val_loss,
            "last_val_acc": result.history[-1].val_acc, "param_count": param_count}


def history_frame(result: TrainResult) -> pd.DataFrame:
    """metrics/<dataset>/history_<name>.csv: one row per checkpoint, columns named as the metrics."""
    return pd.DataFrame([c.as_dict() for c in result.history]).rename(columns=CHECKPOINT_RENAMES)


def checkpoint_values(checkpoint) -> dict[str, float]:
    """A checkpoint's CHECKPOINT_METRICS, under their metric names."""
    values = {CHECKPOINT_RENAMES.get(f, f): v for f, v in checkpoint.as_dict().items()}
    return {key: values[key] for key in CHECKPOINT_METRICS}


def save_model_files(folder, model: RNNClassifier, result: TrainResult, cfg: DictConfig) -> None:
    """best.npz, last.npz and config.yaml into ``folder``."""
    model.set_params(result.best_params)
    model.save(folder / "best.npz")
    model.set_params(result.last_params)
    model.save(folder / "last.npz")
    (folder / "config.yaml").write_text(portable(OmegaConf.to_yaml(cfg, resolve=True)),
                                        encoding="utf-8")


def log_best_model(client, run_id: str, cfg: DictConfig, model_file, example) -> dict:
    """The best parameters as the run's MLflow model ``model``, registered as a new version of
    birnn-<dataset>-<name> if ``cfg.register_model``. Returns what run.json records about it."""
    started = time.monotonic()
    name = (REGISTERED_MODEL.format(dataset=cfg.dataset, name=cfg.name)
            if cfg.register_model else None)
    model_name = runs.training_run_name(cfg.name, cfg.dataset, cfg.train.seed)
    info = logged_model.log_model(client, run_id, model_file, name=model_name,
                                  input_example=example, registered_model_name=name,
                                  tags={"rule": "best"})
    client.set_tag(run_id, runs.LOGGED_MODEL_TAG, model_name)
    found = {"model_id": info.model_id, "model_uri": f"runs:/{run_id}/{model_name}"}
    if name is not None:
        if not client.get_registered_model(name).description:
            client.update_registered_model(name, MODEL_DESCRIPTIONS.get(cfg.model.kind, ""))
        found.update(registered_model=name, model_version=info.registered_model_version)
    log.info("MLflow model logged in %.1f s%s", time.monotonic() - started,
             f": {name} version {info.registered_model_version}" if name else "")
    return found


def self_test(client, run_id: str, cfg: DictConfig, model: RNNClassifier, result: TrainResult,
              data_dir, meta: dict, model_id: str | None = None) -> dict:
    """Test the best and last parameters as the evaluate stage would, into the run (a sweep
    job's default: its report reads them from MLflow), with the per-image predictions as the
    artifact evaluation/test_predictions.npz; return the model's test entry."""
    images, labels = prepared_data.load(data_dir, "test", meta)
    by_rule = {}
    for rule, params in (("best", result.best_params), ("last", result.last_params)):
        by_rule[rule] = copy.deepcopy(model)
        by_rule[rule].set_params(params)
    results = scoring.score(cfg.name, by_rule, images, labels)
    scoring.record(client, run_id, results, meta, model_id)
    sweep_predictions.log_job_predictions(client, run_id, results, labels)
    return scoring.summary_entry(model.param_count()["total"], results)


def rerun_command() -> str:
    """This command as typed: how to record a run that could not be."""
    overrides = " ".join(shlex.quote(o) for o in HydraConfig.get().overrides.task)
    return f"python -m pipeline.stages.train {overrides}".strip()


def _record_failed_job(cfg: DictConfig, error: str) -> None:
    sweep_job.record_failed_job(cfg, error, script=__file__)


@dataclass
class Inputs:
    """What a training reads: the prepared data's description, the training and validation
    images (raw uint8) and labels, the untrained model and its settings."""

    data_dir: Path
    meta: dict
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    model: RNNClassifier
    settings: TrainSettings


def load(cfg: DictConfig) -> Inputs:
    data_dir = project_path(cfg.paths.prepared_dir)
    meta = prepared_data.read_meta(data_dir, cfg.dataset)
    train_images, train_labels = prepared_data.load(data_dir, "train", meta, cfg.train.train_limit)
    val_images, val_labels = prepared_data.load(data_dir, "val", meta, cfg.train.val_limit)
    inputs = Inputs(data_dir, meta, train_images, train_labels, val_images, val_labels,
                    make_model(cfg), make_settings(cfg))
    counts = inputs.model.param_count()
    log.info("%s: %d parameters %s; %d training / %d validation samples of %s",
             cfg.name, counts["total"], {k: v for k, v in counts.items() if k != "total"},
             len(train_labels), len(val_labels), meta["dataset"])
    return inputs


def fit(cfg: DictConfig, inputs: Inputs, on_checkpoint) -> TrainResult:
    # A diverging run overflows before train() notices and raises DivergenceError, the
    # one-line error; numpy's overflow warnings on the way would only bury it.
    with np.errstate(over="ignore", invalid="ignore"):
        return train(inputs.model, inputs.train_images, inputs.train_labels,
                     inputs.val_images, inputs.val_labels, inputs.settings,
                     on_checkpoint=on_checkpoint, log=log.info)


def publish(cfg: DictConfig, inputs: Inputs, result: TrainResult, summary: dict,
            history: pd.DataFrame, run_info: dict) -> tuple[Path, dict]:
    """The training's outputs, before any tracking that follows, so that they are kept
    whatever the store does: the model folder and its metrics files, all or none of them
    (everything is written first, then each is renamed into place). Returns the model
    folder and its run.json."""
    target = project_path(cfg.paths.models_dir) / cfg.name
    metrics_dir = project_path(cfg.paths.metrics_dir)
    # Nested, each written in its own block: a write error names the file it hit.
    with files.atomic_path(metrics_dir / f"history_{cfg.name}.csv") as history_file:
        history_file.write_text(history.to_csv(index=False), encoding="utf-8")
        with files.atomic_path(metrics_dir / f"train_{cfg.name}.json") as summary_file:
            summary_file.write_text(files.json_text(summary), encoding="utf-8")
            with files.publish_dir(target, "model") as staging:
                save_model_files(staging, inputs.model, result, cfg)
                run_info = {**run_info, "weights_sha256": runs.weights_digest(staging)}
                files.write_json(staging / "run.json", run_info)
    log.info("wrote %s and %s/train_%s.json", target, metrics_dir, cfg.name)
    return target, run_info


def track(client, run_id: str, cfg: DictConfig, inputs: Inputs, result: TrainResult,
          summary: dict, history: pd.DataFrame, buffer: metrics.MetricBuffer, target: Path,
          run_info: dict) -> None:
    """After publishing: the summary metrics, the logged (and, if configured, registered)
    model, the test results if configured, and the model folder as artifacts."""
    values = {**summary, "train_seconds": result.seconds}
    buffer.add({key: values[key] for key in SUMMARY_METRICS}, step=0)
    buffer.finish()
    log.info("MLflow: %d metric values sent in %.2f s", buffer.values_sent, buffer.seconds_spent)
    client.set_tag(run_id, "metric_logging_seconds", f"{buffer.seconds_spent:.3f}")
    runs.set_description(client, run_id, scoring.describe(client.get_run(run_id)))
    # At step 0, where the summary is: MLflow attaches it to the model too.
    found = log_best_model(client, run_id, cfg, target / "best.npz", inputs.val_images[:3])
    if cfg.test_after_training:
        entry = self_test(client, run_id, cfg, inputs.model, result, inputs.data_dir,
                          inputs.meta, found["model_id"])
        files.write_json(project_path(cfg.paths.metrics_dir) / f"test_{cfg.name}.json",
                         {cfg.name: entry})
    files.write_json(target / "run.json", {**run_info, **found, "tracking": "complete"})
    with tempfile.TemporaryDirectory() as folder:  # the committed copy is in metrics/
        history.to_csv(Path(folder) / "history.csv", index=False)
        for path in [*sorted(target.iterdir()), Path(folder) / "history.csv"]:
            if not path.name.startswith("."):  # (the output folder's own marker)
                client.log_artifact(run_id, str(path))


def train_task(cfg: DictConfig) -> float:
    """Load, train, publish the outputs, track them; return the best validation loss."""
    client = store.connect(cfg.tracking)  # before the work: an unreachable store fails fast
    with locks.exclusive(project_path(cfg.paths.models_dir) / cfg.name,
                         "wait for it to end, or train into another name=..."):
        return _train(client, cfg)


def _train(client, cfg: DictConfig) -> float:
    inputs = load(cfg)
    run_name, tags = sweep_job.run_identity(
        client, runs.training_run_name(cfg.name, inputs.meta["dataset"], cfg.train.seed),
        run_tags(cfg, inputs.meta))
    with runs.new_run(client, cfg.tracking.experiment_name, run_name, tags,
                      script=__file__) as run_id:
        # Everything run.json needs from the store, asked before training: a store that goes
        # away during it must cost no training (the outputs are published first).
        experiment_id = client.get_run(run_id).info.experiment_id
        runs.log_params(client, run_id, run_params(cfg, inputs.model.param_count(),
                                                   len(inputs.train_labels),
                                                   len(inputs.val_labels)))
        scoring.log_data(client, run_id, inputs.meta,
                         {"train": ("train", len(inputs.train_labels)),
                          "validation": ("val", len(inputs.val_labels))})
        buffer = metrics.MetricBuffer(client, run_id, cfg.tracking.flush_every_seconds)
        result = fit(cfg, inputs, lambda c: buffer.add(checkpoint_values(c), c.iteration))
        summary = summarize(result, inputs.model.param_count()["total"])
        history = history_frame(result)
        run_info = {"run_id": run_id, "run_name": run_name,
                    "experiment_id": experiment_id,
                    "tracking_uri": portable(client.tracking_uri),
                    "tracking": "incomplete", "model": inputs.model.config,
                    "dataset": inputs.meta["dataset"],
                    "data_sha256": prepared_data.fingerprint(inputs.meta)}
        target, run_info = publish(cfg, inputs, result, summary, history, run_info)
        with runs.completing(run_id, f"the model is saved in {target} (run.json: tracking "
                             "incomplete)", rerun_command()):
            track(client, run_id, cfg, inputs, result, summary, history, buffer, target,
                  run_info)
    return float(result.best.val_loss)


main = stage("train", on_job_failure=_record_failed_job)(train_task)

if __name__ == "__main__":
    main()
