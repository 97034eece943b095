"""Stage 2: train one model and track it in MLflow.

    python -m pipeline.train model=uni
    python -m pipeline.train model=bi [experiment=quick] [model.lr=0.02] [train.epochs=50]

Writes models/<name>/ (best.npz, last.npz, history.csv, config.yaml, run.json) and
metrics/train_<name>.json, all only once training succeeded: the folder is written under a
temporary name and swapped in whole. A failed run writes no model files and is marked FAILED
in MLflow with the error in its ``error`` tag.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from birnn.data import scale_pixels
from birnn.models import RNNClassifier, build_model
from birnn.training import LRSchedule, TrainResult, TrainSettings, train
from pipeline import io, prepared, tracking
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


@stage("train")
def main(cfg: DictConfig) -> None:
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

    with tracking.run(client, cfg.tracking.experiment_name, cfg.name, run_tags(cfg, meta)) as run_id:
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

        target = project_path(cfg.paths.models_dir) / cfg.name
        run_info = {"run_id": run_id, "run_name": cfg.name,
                    "experiment_id": client.get_run(run_id).info.experiment_id,
                    "tracking_uri": client.tracking_uri, "model": model.config,
                    "dataset": meta["dataset"], "data_sha256": prepared.fingerprint(meta)}
        with io.staging_dir(target) as staging:
            save_outputs(staging, model, result, cfg, run_info)
            client.log_artifacts(run_id, str(staging))
        io.write_json(project_path(cfg.paths.metrics_dir) / f"train_{cfg.name}.json", summary)
    log.info("wrote %s and metrics/train_%s.json", target, cfg.name)


if __name__ == "__main__":
    main()
