"""Stage 2: train one model and track it in MLflow; with -m, a sweep of them.

    python -m pipeline.stages.train model=uni|bi [dataset=fashion_mnist] [experiment=quick]
    python -m pipeline.stages.train -m model=uni,bi 'train.seed=range(5)' hydra/launcher=joblib

A single run writes models/<dataset>/<name>/ (best.npz, last.npz, config.yaml, run.json),
metrics/<dataset>/train_<name>.json and history_<name>.csv, only once training succeeded, and
registers its best parameters as a version of the MLflow model birnn-<dataset>-<name>. A sweep job
writes the same under its own folder (<sweep dir>/<job>/), registers nothing, tests its model
on the test set before its run ends, and records a failure without stopping the other jobs.
The task returns the best validation loss: the objective of a Hydra sweeper.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import shlex
import tempfile
import time
from pathlib import Path
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
from pipeline.metric_names import CHECKPOINT_METRICS, CHECKPOINT_RENAMES, SUMMARY_METRICS
from pipeline.paths import portable, project_path
from pipeline.sweeps import job as sweep_job
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
    return {"model.kind": cfg.model.kind, "param_count": counts["total"],
            "param_count_by_tensor": json.dumps({k: n for k, n in counts.items() if k != "total"}),
            "hidden_units": sum(chains), "hidden_sizes": "+".join(map(str, chains)),
            "model.lr": cfg.model.lr, "model.lr_milestones": json.dumps(milestones), **steps,
            **({"model.merge": cfg.model.merge} if "merge" in cfg.model else {}),
            **{f"train.{key}": value for key, value in cfg.train.items() if value is not None},
            "data.train_samples": n_train, "data.val_samples": n_val}


def summarize(result: TrainResult, param_count: int) -> dict:
    """metrics/<dataset>/train_<name>.json, also logged as run metrics."""
    return {"best_val_loss": result.best.val_loss, "best_val_acc": result.best.val_acc,
            "best_epoch": result.best.epoch, "best_iteration": result.best.iteration,
            "last_val_loss": result.history[-1].val_loss,
            "last_val_acc": result.history[-1].val_acc,
            "train_seconds": result.seconds, "param_count": param_count}


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


def log_best_model(client, run_id: str, cfg: DictConfig, model_file, example, job) -> dict:
    """The best parameters as the run's MLflow model ``model``; a single run (not a sweep
    job: a sweep would flood the registry) registers it as a new version of birnn-<dataset>-<name>.
    Returns what run.json records about it."""
    started = time.monotonic()
    name = None if job is not None else REGISTERED_MODEL.format(dataset=cfg.dataset, name=cfg.name)
    info = logged_model.log_model(client, run_id, model_file, input_example=example,
                                  registered_model_name=name, tags={"rule": "best"})
    found = {"model_id": info.model_id, "model_uri": f"runs:/{run_id}/model"}
    if name is not None:
        if not client.get_registered_model(name).description:
            client.update_registered_model(name, MODEL_DESCRIPTIONS.get(cfg.model.kind, ""))
        found.update(registered_model=name, model_version=info.registered_model_version)
    log.info("MLflow model logged in %.1f s%s", time.monotonic() - started,
             f": {name} version {info.registered_model_version}" if name else "")
    return found


def self_test(client, run_id: str, cfg: DictConfig, model: RNNClassifier, result: TrainResult,
              data_dir, meta: dict, model_id: str | None = None) -> dict:
    """A sweep job tests its best and last parameters as the evaluate stage would, into its
    run; returns the model's entry of metrics/<dataset>/test.json."""
    images, labels = prepared_data.load(data_dir, "test", meta)
    by_rule = {}
    for rule, params in (("best", result.best_params), ("last", result.last_params)):
        by_rule[rule] = copy.deepcopy(model)
        by_rule[rule].set_params(params)
    results = scoring.score(cfg.name, by_rule, images, labels)
    scoring.record(client, run_id, results, meta, model_id)
    return scoring.summary_entry(model.param_count()["total"], results)


@contextlib.contextmanager
def job_timer(client, run_id: str, job, started: float) -> Iterator[None]:
    """A sweep job's run gets ``job_seconds`` (since ``started``) however the job ends: the
    sweep's parallel speed-up is its wall time over the sum of these."""
    try:
        yield
    finally:
        if job is not None:
            try:
                metrics.log_metrics(client, run_id, {"job_seconds": time.monotonic() - started})
            except Exception as exc:  # the store may be gone: the job's own outcome matters
                log.warning("could not log job_seconds: %s", exc)


def rerun_command() -> str:
    """This command as typed: how to record a run that could not be."""
    overrides = " ".join(shlex.quote(o) for o in HydraConfig.get().overrides.task)
    return f"python -m pipeline.stages.train {overrides}".strip()


def _record_failed_job(cfg: DictConfig, error: str) -> None:
    sweep_job.record_failed_job(cfg, error, script=__file__)


def train_task(cfg: DictConfig) -> float:
    """Train, track, write the outputs; return the best validation loss."""
    started = time.monotonic()
    job = sweep_job.current_job()  # None for a single run
    client = store.connect(cfg.tracking)  # before the work: an unreachable store fails fast
    data_dir = project_path(cfg.paths.prepared_dir)
    meta = prepared_data.read_meta(data_dir, cfg.dataset)
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
        experiment = client.get_run(run_id).info.experiment_id
        runs.log_params(client, run_id, run_params(cfg, counts, len(train_y), len(val_y)))
        scoring.log_data(client, run_id, meta, {"train": ("train", len(train_y)),
                                                "validation": ("val", len(val_y))})
        buffer = metrics.MetricBuffer(client, run_id, cfg.tracking.flush_every_seconds)
        # A diverging run overflows before train() notices and raises DivergenceError, the
        # one-line error; numpy's overflow warnings on the way would only bury it.
        with np.errstate(over="ignore", invalid="ignore"):
            result = train(model, train_x, train_y, val_x, val_y, settings,
                           on_checkpoint=lambda c: buffer.add(checkpoint_values(c), c.iteration),
                           log=log.info)
        summary = summarize(result, counts["total"])
        target = models_dir / cfg.name
        history = history_frame(result)
        run_info = {"run_id": run_id, "run_name": run_name, "experiment_id": experiment,
                    "tracking_uri": portable(client.tracking_uri), "tracking": "incomplete",
                    "model": model.config, "dataset": meta["dataset"],
                    "data_sha256": prepared_data.fingerprint(meta)}
        # The training's outputs first: whatever the store does from here on, they are kept.
        with files.publish_dir(target, "model") as staging:
            save_model_files(staging, model, result, cfg)
            files.write_json(staging / "run.json", run_info)
        files.write_text(metrics_dir / f"history_{cfg.name}.csv", history.to_csv(index=False))
        files.write_json(metrics_dir / f"train_{cfg.name}.json", summary)
        with runs.completing(run_id, f"the model is saved in {target} (run.json: tracking "
                             "incomplete)", rerun_command()):
            buffer.add({key: summary[key] for key in SUMMARY_METRICS}, step=0)
            buffer.finish()
            log.info("MLflow: %d metric values sent in %.2f s", buffer.values_sent,
                     buffer.seconds_spent)
            client.set_tag(run_id, "metric_logging_seconds", f"{buffer.seconds_spent:.3f}")
            runs.set_description(client, run_id, scoring.describe(client.get_run(run_id)))
            # At step 0, where the summary is: MLflow attaches it to the model too.
            found = log_best_model(client, run_id, cfg, target / "best.npz", val_images[:3], job)
            test_summary = (self_test(client, run_id, cfg, model, result, data_dir, meta,
                                      found["model_id"]) if job else None)
            files.write_json(target / "run.json", {**run_info, **found, "tracking": "complete"})
            with tempfile.TemporaryDirectory() as folder:  # the committed copy is in metrics/
                history.to_csv(Path(folder) / "history.csv", index=False)
                for path in [*sorted(target.iterdir()), Path(folder) / "history.csv"]:
                    if not path.name.startswith("."):  # (the output folder's own marker)
                        client.log_artifact(run_id, str(path))
            if job is not None:
                files.write_json(metrics_dir / "test.json", {cfg.name: test_summary})
    log.info("wrote %s and %s/train_%s.json", target, metrics_dir, cfg.name)
    if job is not None:
        sweep_job.log_progress(client, job.sweep_id)
    return float(result.best.val_loss)


main = stage("train", on_job_failure=_record_failed_job)(train_task)

if __name__ == "__main__":
    main()
