"""Stage 2: train one model and track it in MLflow; with -m, a sweep of them.

    python -m pipeline.stages.train model=uni|bi [experiment=quick] [model.lr=0.02]
    python -m pipeline.stages.train -m model=uni,bi 'train.seed=range(5)' hydra/launcher=joblib

A single run writes models/<name>/ (best.npz, last.npz, config.yaml, run.json),
metrics/train_<name>.json and metrics/history_<name>.csv, only once training succeeded. A
sweep job writes the same under its own folder (<sweep dir>/<job>/), tests its model on the
test set before its run ends, and records a failure without stopping the other jobs.
The task returns the best validation loss: the objective of a Hydra sweeper.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
from typing import Iterator

import numpy as np
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from birnn.data import scale_pixels
from birnn.models import RNNClassifier, build_model
from birnn.training import LRSchedule, TrainResult, TrainSettings, train
from pipeline import files, prepared_data, schema, scoring
from pipeline.entrypoint import stage
from pipeline.metric_names import CHECKPOINT_METRICS
from pipeline.paths import project_path
from pipeline.sweeps import job as sweep_job
from pipeline.tracking import metrics, runs, store

log = logging.getLogger(__name__)

ARCHITECTURE_KEYS = {"uni": ("hidden_size",), "bi": ("hidden_fwd", "hidden_bwd", "merge")}


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
    """The resolved config flattened, plus parameter counts (total and per tensor) and the
    number of samples actually used: the same names for both models, so MLflow's Compare
    view lines them up."""
    return {**runs.flatten(cfg), "param_count": counts["total"],
            **{f"param_count.{name}": n for name, n in counts.items() if name != "total"},
            "data.train_samples": n_train, "data.val_samples": n_val}


def summarize(result: TrainResult, param_count: int) -> dict:
    """metrics/train_<name>.json, also logged as run metrics."""
    return {"best_val_loss": result.best.val_loss, "best_val_acc": result.best.val_acc,
            "best_epoch": result.best.epoch, "best_iteration": result.best.iteration,
            "last_val_loss": result.history[-1].val_loss,
            "last_val_acc": result.history[-1].val_acc,
            "train_seconds": result.seconds, "param_count": param_count}


def save_model_files(folder, model: RNNClassifier, result: TrainResult, cfg: DictConfig,
                     run_info: dict) -> None:
    """best.npz, last.npz, config.yaml and run.json into ``folder``."""
    model.set_params(result.best_params)
    model.save(folder / "best.npz")
    model.set_params(result.last_params)
    model.save(folder / "last.npz")
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
    files.write_json(folder / "run.json", run_info)


def self_test(client, run_id: str, cfg: DictConfig, model: RNNClassifier, result: TrainResult,
              data_dir, meta: dict) -> dict:
    """A sweep job tests its best and last parameters as the evaluate stage would, into its
    run; returns the model's entry of metrics/test.json."""
    images, labels = prepared_data.load(data_dir, "test", meta)
    by_rule = {}
    for rule, params in (("best", result.best_params), ("last", result.last_params)):
        by_rule[rule] = copy.deepcopy(model)
        by_rule[rule].set_params(params)
    results = scoring.score(cfg.name, by_rule, images, labels)
    scoring.record(client, run_id, results, f"{meta['dataset']} test ({len(labels)} images)")
    return scoring.summary_entry(model.param_count()["total"], results)


@contextlib.contextmanager
def job_timer(client, run_id: str, job, started: float) -> Iterator[None]:
    """A sweep job's run gets ``job_seconds`` (since ``started``) however the job ends: the
    sweep's parallel speed-up is its wall time over the sum of these."""
    try:
        yield
    finally:
        if job is not None:
            metrics.log_metrics(client, run_id, {"job_seconds": time.monotonic() - started})


def _record_failed_job(cfg: DictConfig, error: str) -> None:
    sweep_job.record_failed_job(cfg, error, script=__file__)


def train_task(cfg: DictConfig) -> float:
    """Train, track, write the outputs; return the best validation loss."""
    started = time.monotonic()
    job = sweep_job.current_job()  # None for a single run
    client = store.connect(cfg.tracking)  # before the work: an unreachable store fails fast
    data_dir = project_path(cfg.paths.prepared_dir)
    meta = prepared_data.read_meta(data_dir)
    train_images, train_y = prepared_data.load(data_dir, "train", meta, cfg.train.train_limit)
    val_images, val_y = prepared_data.load(data_dir, "val", meta, cfg.train.val_limit)
    train_x = scale_pixels(train_images, cfg.train.dtype)
    val_x = scale_pixels(val_images, cfg.train.dtype)
    model, settings = make_model(cfg), make_settings(cfg)
    counts = model.param_count()
    log.info("%s: %d parameters %s; %d training / %d validation samples of %s",
             cfg.name, counts["total"], {k: v for k, v in counts.items() if k != "total"},
             len(train_y), len(val_y), meta["dataset"])

    tags, run_name = run_tags(cfg, meta), cfg.name
    if job is not None:
        parent = sweep_job.parent_run(client, job)
        tags.update(job.tags(parent))
        run_name = job.run_name(cfg.name, parent)
    # A sweep job's files go to its own output folder, never into models/ and metrics/.
    models_dir = job.output_dir / "models" if job else project_path(cfg.paths.models_dir)
    metrics_dir = job.output_dir / "metrics" if job else project_path(cfg.paths.metrics_dir)

    with runs.new_run(client, cfg.tracking.experiment_name, run_name, tags,
                      script=__file__) as run_id, job_timer(client, run_id, job, started):
        runs.log_params(client, run_id, run_params(cfg, counts, len(train_y), len(val_y)))
        buffer = metrics.MetricBuffer(client, run_id, cfg.tracking.flush_every_seconds)
        # A diverging run overflows before train() notices and raises DivergenceError, the
        # one-line error; numpy's overflow warnings on the way would only bury it.
        with np.errstate(over="ignore", invalid="ignore"):
            result = train(model, train_x, train_y, val_x, val_y, settings,
                           on_checkpoint=lambda c: buffer.add(
                               {key: getattr(c, key) for key in CHECKPOINT_METRICS}, c.iteration),
                           log=log.info)
        summary = summarize(result, counts["total"])
        buffer.add(summary, step=0)
        buffer.flush()
        log.info("MLflow: %d metric values sent in %.2f s", buffer.values_sent,
                 buffer.seconds_spent)
        client.set_tag(run_id, "metric_logging_seconds", f"{buffer.seconds_spent:.3f}")
        test_summary = (self_test(client, run_id, cfg, model, result, data_dir, meta)
                        if job else None)

        target = models_dir / cfg.name
        run_info = {"run_id": run_id, "run_name": run_name,
                    "experiment_id": client.get_run(run_id).info.experiment_id,
                    "tracking_uri": client.tracking_uri, "model": model.config,
                    "dataset": meta["dataset"], "data_sha256": prepared_data.fingerprint(meta)}
        history = pd.DataFrame([c.as_dict() for c in result.history])
        with files.publish_dir(target) as staging:
            save_model_files(staging, model, result, cfg, run_info)
            history.to_csv(staging / "history.csv", index=False)  # logged with the model files
            client.log_artifacts(run_id, str(staging))
            (staging / "history.csv").unlink()  # the committed copy is metrics/history_<name>.csv
        files.write_text(metrics_dir / f"history_{cfg.name}.csv", history.to_csv(index=False))
        files.write_json(metrics_dir / f"train_{cfg.name}.json", summary)
        if job is not None:
            files.write_json(metrics_dir / "test.json", {cfg.name: test_summary})
    log.info("wrote %s and %s/train_%s.json", target, metrics_dir, cfg.name)
    if job is not None:
        sweep_job.log_progress(client, job.sweep_id)
    return float(result.best.val_loss)


main = stage("train", on_job_failure=_record_failed_job)(train_task)

if __name__ == "__main__":
    main()
