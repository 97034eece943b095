"""Stage 2: train one model and track it in MLflow; or, with -m, a sweep of them.

    python -m pipeline.train model=uni
    python -m pipeline.train model=bi [experiment=quick] [model.lr=0.02] [train.epochs=50]
    python -m pipeline.train -m model=uni,bi train.seed=0,1,2,3,4 hydra/launcher=joblib

A single run writes models/<name>/ (best.npz, last.npz, history.csv, config.yaml, run.json)
and metrics/train_<name>.json, all only once training succeeded: the folder is written under a
temporary name and swapped in whole. A failed run writes no model files, is marked FAILED
in MLflow with the error in its ``error`` tag, and the command exits 1 with the error in one line.

A sweep job (``-m``; see pipeline.sweep) differs in three ways. Its files go under its own
output directory, <sweep dir>/<job number>/models/<name>/ and .../metrics/, so parallel jobs
never overwrite each other or the DVC pipeline's models/. It tests its model on the prepared
test set before its run ends (the evaluate stage's metrics: test_loss_best, test_acc_best,
test_loss_last, test_acc_last, per-class accuracies, confusion matrices), so a finished sweep
is ready for ``python -m pipeline.compare sweep=<id>`` with no manual step. And a failure is
recorded (the run marked FAILED with its error) without stopping the other jobs; the sweep
ends non-zero, naming the failed jobs (pipeline.sweep_callback). Its run also records
``job_seconds``, the job's whole time (data, training, testing, tracking), next to
``train_seconds``.
"""

from __future__ import annotations

import contextlib
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
from birnn.training import LRSchedule, TrainResult, TrainSettings, evaluate, train
from pipeline import evaluate as evaluate_stage
from pipeline import io, prepared, sweep, tracking
from pipeline.cli import stage
from pipeline.paths import project_path

log = logging.getLogger(__name__)

ARCHITECTURE_KEYS = {"uni": ("hidden_size",), "bi": ("hidden_fwd", "hidden_bwd", "merge")}
CHECKPOINT_METRICS = ("val_loss", "val_acc", "train_loss", "train_acc", "lr")


def make_model(cfg: DictConfig) -> RNNClassifier:
    sizes = {key: cfg.model[key] for key in ARCHITECTURE_KEYS[cfg.model.kind]}
    return build_model(cfg.model.kind, seed=cfg.train.seed, dtype=cfg.train.dtype, **sizes)


def make_settings(cfg: DictConfig) -> TrainSettings:
    schedule = LRSchedule(cfg.model.lr, {int(e): float(lr) for e, lr in cfg.model.lr_milestones.items()})
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
        "data_sha256": prepared.fingerprint(meta),
        "hydra_overrides": json.dumps(list(hydra.overrides.task)),
    }


def run_params(cfg: DictConfig, counts: dict[str, int], n_train: int, n_val: int) -> dict:
    """The resolved config flattened, plus parameter counts (total and per tensor) and the
    number of samples actually used: the same names for both models, so MLflow's Compare
    view lines them up."""
    return {**tracking.flatten(cfg), "param_count": counts["total"],
            **{f"param_count.{name}": n for name, n in counts.items() if name != "total"},
            "data.train_samples": n_train, "data.val_samples": n_val}


def summarize(result: TrainResult, param_count: int) -> dict:
    """metrics/train_<name>.json, also logged as run metrics."""
    return {"best_val_loss": result.best.val_loss, "best_val_acc": result.best.val_acc,
            "best_epoch": result.best.epoch, "best_iteration": result.best.iteration,
            "last_val_loss": result.history[-1].val_loss,
            "last_val_acc": result.history[-1].val_acc,
            "train_seconds": result.seconds, "param_count": param_count}


def save_outputs(folder, model: RNNClassifier, result: TrainResult, cfg: DictConfig,
                 run_info: dict) -> None:
    """best.npz, last.npz, history.csv, config.yaml and run.json into ``folder``."""
    model.set_params(result.best_params)
    model.save(folder / "best.npz")
    model.set_params(result.last_params)
    model.save(folder / "last.npz")
    pd.DataFrame([c.as_dict() for c in result.history]).to_csv(folder / "history.csv", index=False)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
    io.write_json(folder / "run.json", run_info)


def test_and_track(client, run_id: str, cfg: DictConfig, model: RNNClassifier,
                   result: TrainResult, data_dir, meta: dict) -> dict:
    """A sweep job tests its best and last parameters as the evaluate stage would, into its
    run; returns the model's entry of metrics/test.json."""
    images, labels = prepared.load(data_dir, "test", meta)
    test_x = scale_pixels(images, cfg.train.dtype)
    results = {}
    for rule, params in (("best", result.best_params), ("last", result.last_params)):
        model.set_params(params)
        results[rule] = evaluate(model, test_x, labels)
        log.info("%s, %s parameters: test loss %.6f, accuracy %.2f%%", cfg.name, rule,
                 results[rule].loss, 100 * results[rule].accuracy)
    evaluate_stage.track(client, run_id, cfg.name, results,
                         f"{meta['dataset']} test ({len(labels)} images)")
    return {"param_count": model.param_count()["total"],
            **{rule: {"loss": ev.loss, "accuracy": ev.accuracy} for rule, ev in results.items()}}


@contextlib.contextmanager
def job_timer(client, run_id: str, job, started: float) -> Iterator[None]:
    """A sweep job's run gets ``job_seconds`` (since ``started``) however the job ends: the
    sweep's parallel speed-up is its wall time over the sum of these."""
    try:
        yield
    finally:
        if job is not None:
            tracking.log_metrics(client, run_id, {"job_seconds": time.monotonic() - started})


def _record_failed_job(cfg: DictConfig, error: str) -> None:
    sweep.record_failed_job(cfg, error, script=__file__)


@stage("train", on_job_failure=_record_failed_job)
def main(cfg: DictConfig) -> None:
    started = time.monotonic()
    job = sweep.current_job()  # None for a single run
    client = tracking.connect(cfg.tracking)  # before the work: an unreachable store fails fast
    data_dir = project_path(cfg.paths.prepared_dir)
    meta = prepared.read_meta(data_dir)
    train_images, train_y = prepared.load(data_dir, "train", meta, cfg.train.train_limit)
    val_images, val_y = prepared.load(data_dir, "val", meta, cfg.train.val_limit)
    train_x = scale_pixels(train_images, cfg.train.dtype)
    val_x = scale_pixels(val_images, cfg.train.dtype)
    model, settings = make_model(cfg), make_settings(cfg)
    counts = model.param_count()
    log.info("%s: %d parameters %s; %d training / %d validation samples of %s",
             cfg.name, counts["total"], {k: v for k, v in counts.items() if k != "total"},
             len(train_y), len(val_y), meta["dataset"])

    tags, run_name = run_tags(cfg, meta), cfg.name
    if job is not None:
        parent = sweep.parent_run(client, job)
        tags.update(job.tags(parent))
        run_name = job.run_name(cfg.name, parent)
    # A sweep job's files go to its own output folder (see the module docstring).
    models_dir = job.output_dir / "models" if job else project_path(cfg.paths.models_dir)
    metrics_dir = job.output_dir / "metrics" if job else project_path(cfg.paths.metrics_dir)

    with tracking.run(client, cfg.tracking.experiment_name, run_name, tags,
                      script=__file__) as run_id, job_timer(client, run_id, job, started):
        tracking.log_params(client, run_id, run_params(cfg, counts, len(train_y), len(val_y)))
        metrics = tracking.MetricBuffer(client, run_id, cfg.tracking.flush_every_seconds)
        # A diverging run overflows before train() notices and raises DivergenceError, the
        # one-line error; numpy's overflow warnings on the way would only bury it.
        with np.errstate(over="ignore", invalid="ignore"):
            result = train(model, train_x, train_y, val_x, val_y, settings,
                           on_checkpoint=lambda c: metrics.add(
                               {key: getattr(c, key) for key in CHECKPOINT_METRICS}, c.iteration),
                           log=log.info)
        summary = summarize(result, counts["total"])
        metrics.add(summary, step=0)
        metrics.flush()
        log.info("MLflow: %d metric values sent in %.2f s", metrics.values_sent,
                 metrics.seconds_spent)
        client.set_tag(run_id, "metric_logging_seconds", f"{metrics.seconds_spent:.3f}")
        test_summary = (test_and_track(client, run_id, cfg, model, result, data_dir, meta)
                        if job else None)

        target = models_dir / cfg.name
        run_info = {"run_id": run_id, "run_name": run_name,
                    "experiment_id": client.get_run(run_id).info.experiment_id,
                    "tracking_uri": client.tracking_uri, "model": model.config,
                    "dataset": meta["dataset"], "data_sha256": prepared.fingerprint(meta)}
        with io.staging_dir(target) as staging:
            save_outputs(staging, model, result, cfg, run_info)
            client.log_artifacts(run_id, str(staging))
        io.write_json(metrics_dir / f"train_{cfg.name}.json", summary)
        if job is not None:
            io.write_json(metrics_dir / "test.json", {cfg.name: test_summary})
    log.info("wrote %s and %s/train_%s.json", target, metrics_dir, cfg.name)


if __name__ == "__main__":
    main()
