"""Testing a trained model's best and last parameters on the test set, and recording the
results in its run: shared by the evaluate stage and by a sweep job, which tests its own model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import numpy as np

from birnn.data import scale_pixels
from birnn.models import RNNClassifier, load_model
from birnn.training import Evaluation, evaluate
from pipeline.errors import StageError
from pipeline.metric_names import RULES, test_metric
from pipeline.tracking import metrics

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


def load_rules(model_dir: Path) -> dict[str, RNNClassifier]:
    """models/<name>/best.npz and last.npz, loaded."""
    loaded = {}
    for rule in RULES:
        path = model_dir / f"{rule}.npz"
        try:
            loaded[rule] = load_model(path)
        except (OSError, ValueError) as exc:
            raise StageError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from None
    return loaded


def summary_entry(param_count: int, results: Mapping[str, Evaluation]) -> dict:
    """A model's entry of metrics/test.json."""
    return {"param_count": param_count,
            **{rule: {"loss": ev.loss, "accuracy": ev.accuracy} for rule, ev in results.items()}}


def details(results: Mapping[str, Evaluation]) -> dict:
    return {rule: {"loss": ev.loss, "accuracy": ev.accuracy,
                   "per_class_accuracy": [float(a) for a in ev.per_class_accuracy],
                   "confusion": ev.confusion.tolist()}
            for rule, ev in results.items()}


def run_metrics(results: Mapping[str, Evaluation]) -> dict[str, float]:
    values = {}
    for rule, ev in results.items():
        values[test_metric("loss", rule)] = ev.loss
        values[test_metric("acc", rule)] = ev.accuracy
        values.update({f"{test_metric('acc', rule)}_class{k}": float(acc)
                       for k, acc in enumerate(ev.per_class_accuracy)})
    return values


def record(client, run_id: str, results: Mapping[str, Evaluation], evaluated_on: str) -> None:
    """The test results into the model's training run: metrics and the details file."""
    metrics.log_metrics(client, run_id, run_metrics(results))
    client.log_dict(run_id, details(results), "evaluation/test_details.json")
    client.set_tag(run_id, "evaluated_on", evaluated_on)
