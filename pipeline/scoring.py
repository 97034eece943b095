"""Testing a trained model's best and last parameters on the test set, and recording the
results in its run (metrics, the per-class table, the data used, the run's description):
shared by the evaluate stage and by a sweep job, which tests its own model."""

from __future__ import annotations

import logging
import zipfile
import zlib
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from birnn.data import scale_pixels
from birnn.models import RNNClassifier, load_model
from birnn.training import Evaluation, evaluate
from pipeline import prepared_data
from pipeline.guard.errors import MissingInputError, StageError
from pipeline.metric_names import PER_CLASS_TABLE, RULES, TEST_METRICS, test_metric
from pipeline.tracking import logged_model, metrics, runs

log = logging.getLogger(__name__)


def score(name: str, models: Mapping[str, RNNClassifier], images: np.ndarray,
          labels: np.ndarray) -> dict[str, Evaluation]:
    """Test ``models[rule]`` for every rule on uint8 ``images`` (N, 28, 28)."""
    scaled: dict[str, np.ndarray] = {}  # scale once per dtype
    results = {}
    for rule in RULES:
        model = models[rule]
        x = scaled.setdefault(model.dtype, scale_pixels(images, model.dtype))
        results[rule] = evaluate(model, x, labels)
        log.info("%s, %s parameters: test loss %.6f, accuracy %.2f%%", name, rule,
                 results[rule].loss, 100 * results[rule].accuracy)
    return results


def load_rules(model_dir: Path, retrain: str) -> dict[str, RNNClassifier]:
    """models/<dataset>/<name>/best.npz and last.npz, loaded; ``retrain``: the command that
    writes them again, for the error."""
    loaded = {}
    for rule in RULES:
        path = model_dir / f"{rule}.npz"
        if not path.is_file():
            raise MissingInputError(f"{path}: no such file: train this model first ({retrain})")
        # A saved model is a zip (np.savez). Anything else would reach numpy's pickle
        # fallback, whose error suggests loading the file unsafely (allow_pickle).
        if not zipfile.is_zipfile(path):
            raise StageError(f"{path}: not a saved model (not an .npz archive): retrain it "
                             f"({retrain})")
        try:
            loaded[rule] = load_model(path)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            reason = " ".join(str(exc).replace(f"{path}: ", "").split())
            raise StageError(f"{path}: not a saved model ({reason}): retrain it ({retrain})") \
                from None
    return loaded


def summary_entry(param_count: int, results: Mapping[str, Evaluation]) -> dict:
    """A model's entry of metrics/<dataset>/test.json."""
    return {"param_count": param_count,
            **{rule: {"loss": ev.loss, "accuracy": ev.accuracy} for rule, ev in results.items()}}


def details(results: Mapping[str, Evaluation]) -> dict:
    return {rule: {"loss": ev.loss, "accuracy": ev.accuracy,
                   "per_class_accuracy": [float(a) for a in ev.per_class_accuracy],
                   "confusion": ev.confusion.tolist()}
            for rule, ev in results.items()}


def run_metrics(results: Mapping[str, Evaluation]) -> dict[str, float]:
    """test_acc_best, test_loss_best, test_acc_last, test_loss_last."""
    values = {}
    for rule, ev in results.items():
        values[test_metric("acc", rule)] = ev.accuracy
        values[test_metric("loss", rule)] = ev.loss
    return values


def per_class_table(results: Mapping[str, Evaluation]) -> pd.DataFrame:
    """One row per rule and digit: its test images, how many were recognised, the share."""
    return pd.DataFrame([{"rule": rule, "digit": digit, "images": int(ev.confusion[digit].sum()),
                          "correct": int(ev.confusion[digit, digit]),
                          "accuracy": float(ev.per_class_accuracy[digit])}
                         for rule, ev in results.items()
                         for digit in range(len(ev.per_class_accuracy))])


def dataset_name(meta: dict, split: str, rows: int) -> str:
    """'mnist-train', or 'mnist-val[:1000]' for the first 1,000 of a split (a limit)."""
    name = f"{meta['dataset']}-{split}"
    return name if rows == meta["counts"][split] else f"{name}[:{rows}]"


def log_data(client, run_id: str, meta: dict, used: Mapping[str, tuple[str, int]]) -> None:
    """The prepared data a run used as its MLflow inputs: ``used`` maps a context ('train',
    'validation', 'test') to the split and the number of its rows used. Source: the raw
    files; digest: the prepared data's fingerprint."""
    runs.log_data_inputs(client, run_id, meta["source"], prepared_data.fingerprint(meta),
                         {context: (dataset_name(meta, split, rows), rows)
                          for context, (split, rows) in used.items()})


def already_recorded(run, results: Mapping[str, Evaluation]) -> bool:
    """The run holds exactly these test results (evaluate rerun on an unchanged model)."""
    tracked = run.data.metrics
    return all(tracked.get(key) == value for key, value in run_metrics(results).items())


def record(client, run_id: str, results: Mapping[str, Evaluation], meta: dict,
           model_id: str | None = None) -> bool:
    """The test results into the model's training run: the four test metrics (those of the
    best parameters attached to the logged model ``model_id``, which holds them), the
    per-class table, the details file, the test data as an input, and the description.
    Returns False, writing nothing, if the run already holds these results (evaluate rerun
    on an unchanged model: log_table would append the same rows again)."""
    if already_recorded(client.get_run(run_id), results):
        log.info("run %s already holds these test results: not logged again", run_id)
        return False
    values = run_metrics(results)
    rows = len(results["best"].predictions)
    test_data = dataset_name(meta, "test", rows)
    if model_id is not None:
        best = {key: values.pop(key) for key in (test_metric("acc", "best"),
                                                 test_metric("loss", "best"))}
        logged_model.log_model_metrics(
            client, model_id, best, run_id=run_id, dataset_name=test_data,
            dataset_digest=runs.dataset_digest(prepared_data.fingerprint(meta)))
    metrics.log_metrics(client, run_id, values)
    client.log_table(run_id, per_class_table(results), PER_CLASS_TABLE)
    client.log_dict(run_id, details(results), "evaluation/test_details.json")
    client.set_tag(run_id, "evaluated_on", f"{meta['dataset']} test ({rows} images)")
    log_data(client, run_id, meta, {"test": ("test", rows)})
    runs.set_description(client, run_id, describe(client.get_run(run_id)))
    return True


def describe_version(client, registered_model: str, version, run) -> None:
    """A registered version's test results, as tags (the registry's version page shows no
    metrics) and a description naming the run that trained it (which the page links)."""
    values, params = run.data.metrics, run.data.params
    if not all(key in values for key in TEST_METRICS):
        return
    for key in TEST_METRICS:
        client.set_model_version_tag(registered_model, str(version), key, f"{values[key]:.4f}")
    client.update_model_version(
        registered_model, str(version),
        f"Test accuracy {_percent(values[test_metric('acc', 'best')])} with the best parameters "
        f"(loss {values[test_metric('loss', 'best')]:.4f}), "
        f"{_percent(values[test_metric('acc', 'last')])} with the last; "
        f"{int(params.get('param_count', 0)):,} parameters. Trained and tested in run "
        f"{run.info.run_name} ({run.info.run_id}): {run.data.tags.get('evaluated_on', '?')}.")


# ------------------------------------------------------------------------ the run's page
def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def describe(run) -> str:
    """A training run's description (Markdown, shown on its page): what was trained, how,
    and how it scored, from the run's own params, metrics and tags."""
    params, values, tags = run.data.params, run.data.metrics, run.data.tags

    def param(key: str) -> str:
        return params.get(key, "?")

    kind = params.get("model.kind", tags.get("model_kind", "?"))
    units = params.get("hidden_sizes", "?")
    if kind == "uni":
        model = f"unidirectional vanilla RNN, {units} tanh units"
    else:
        merge = params.get("model.merge", "?")
        model = (f"bidirectional vanilla RNN, two chains of {units.replace('+', ' + ')} tanh "
                 f"units (forward and reversed), final states merged by `{merge}`")
    lines = [f"**{run.info.run_name}**: {model}, {int(params.get('param_count', 0)):,} "
             f"parameters; preset `{tags.get('preset', '?')}`: {param('train.epochs')} epochs, "
             f"batch {param('train.batch_size')}, learning rate {param('model.lr')}, seed "
             f"{param('train.seed')}, {param('data.train_samples')} training images."]
    if "best_val_loss" in values:
        lines.append(f"\nLowest validation loss {values['best_val_loss']:.4f} (accuracy "
                     f"{_percent(values['best_val_acc'])}) at epoch {int(values['best_epoch'])}, "
                     f"after {values['train_seconds']:.0f} s of training.")
    if all(key in values for key in TEST_METRICS):
        lines.append(
            f"\n**Test accuracy {_percent(values[test_metric('acc', 'best')])}** (loss "
            f"{values[test_metric('loss', 'best')]:.4f}) with the best parameters, "
            f"{_percent(values[test_metric('acc', 'last')])} (loss "
            f"{values[test_metric('loss', 'last')]:.4f}) with the last; per digit: "
            f"`{PER_CLASS_TABLE}`.")
    else:
        lines.append("\nNot tested yet (the evaluate stage adds the test results).")
    logged = tags.get(runs.LOGGED_MODEL_TAG, "model")
    lines.append(f"\nThe best parameters are logged as the MLflow model `{logged}` "
                 f"(`runs:/{run.info.run_id}/{logged}`); the resolved configuration is "
                 "`config.yaml`, the curves `val_loss`, `val_acc`, `batch_loss`, `lr`.")
    return "\n".join(lines)
