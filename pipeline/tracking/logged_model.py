"""The MLflow Model of a trained birnn classifier: log it, attach test metrics, register, alias.

Input: a DataFrame of int columns ``pixel0`` .. ``pixel783``, the RAW pixels 0..255 of one
28 x 28 image per row, row-major (:func:`images_frame` builds it); output: the predicted digit
of every row (int64). The server takes ``{"dataframe_split": {"columns": [...], "data": [...]}}``
and answers ``{"predictions": [7, 2, ...]}``. How it is stored and why (models from code,
birnn shipped inside, logged inside its run): docs/architecture.md, "Logged models".
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import ColSpec, Schema, TensorSpec
from threadpoolctl import threadpool_limits

import birnn
from birnn.data import scale_pixels
from birnn.models import load_model

IMAGE_SHAPE = (28, 28)
NUM_PIXELS = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
PIXEL_COLUMNS = [f"pixel{i}" for i in range(NUM_PIXELS)]
WEIGHTS_ARTIFACT = "weights"       # the .npz, as context.artifacts[WEIGHTS_ARTIFACT]
BOOK_ALIAS = "book"
REQUIREMENTS = ("mlflow", "numpy", "pandas", "threadpoolctl")   # birnn itself is shipped


# ---------------------------------------------------------------------------- the model
def images_frame(images: Any) -> pd.DataFrame:
    """The model's input for ``images``: (N, 28, 28) or (N, 784) raw pixel values 0..255
    -> DataFrame with int64 columns ``pixel0`` .. ``pixel783``, one image per row."""
    return pd.DataFrame(_pixel_matrix(images, allow_3d=True).astype(np.int64),
                        columns=PIXEL_COLUMNS)


class PixelInputError(MlflowException, ValueError):
    """Input that breaks the contract. A ValueError for Python callers; an MlflowException
    with INVALID_PARAMETER_VALUE, so that the server answers 400 (any other exception in
    ``predict`` is a 500)."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def _pixel_matrix(model_input: Any, allow_3d: bool = False) -> np.ndarray:
    """Check the input contract; return the pixels as a uint8 (N, 784) matrix."""
    if isinstance(model_input, pd.DataFrame):
        missing = [c for c in PIXEL_COLUMNS if c not in model_input.columns]
        if missing:
            raise PixelInputError(f"input DataFrame lacks {len(missing)} of the 784 pixel "
                                  f"columns pixel0..pixel783 (first missing: {missing[0]})")
        values = model_input[PIXEL_COLUMNS].to_numpy()
    else:
        values = np.asarray(model_input)
        if allow_3d and values.ndim == 3 and values.shape[1:] == IMAGE_SHAPE:
            values = values.reshape(len(values), NUM_PIXELS)
    if values.ndim != 2 or values.shape[1] != NUM_PIXELS:
        raise PixelInputError(f"expected {NUM_PIXELS} pixel values per row (28 x 28 images, "
                              f"row-major), got input of shape {values.shape}")
    if not np.issubdtype(values.dtype, np.integer):
        raise PixelInputError(f"pixel values must be integers 0..255 (raw MNIST bytes, not "
                              f"scaled), got dtype {values.dtype}")
    if values.size == 0:
        return values.astype(np.uint8)
    if values.min() < 0 or values.max() > 255:
        bad = int(np.count_nonzero((values < 0) | (values > 255)))
        raise PixelInputError(f"pixel values must lie in 0..255, got {bad} outside "
                              f"(min {values.min()}, max {values.max()})")
    dim = np.flatnonzero(values.max(axis=1) == 1)
    if dim.size:
        raise PixelInputError(f"{dim.size} image(s) (first: row {dim[0]}) have no pixel above 1 "
                              f"of 255: pixels scaled to [0, 1]? Send the raw values 0..255")
    return values.astype(np.uint8)


def predict_digits(classifier: birnn.RNNClassifier, model_input: Any) -> np.ndarray:
    """Predicted digits (int64, (N,)) of ``classifier`` for input following the contract,
    computed as ``birnn.training.evaluate`` computes its predictions."""
    images = _pixel_matrix(model_input).reshape(-1, *IMAGE_SHAPE)
    with threadpool_limits(limits=1, user_api="blas"):
        logits = classifier.predict_logits(scale_pixels(images, classifier.dtype))
    return logits.argmax(axis=1).astype(np.int64)


class DigitClassifier(mlflow.pyfunc.PythonModel):
    """The pyfunc face of a birnn ``RNNClassifier`` (uni or bi) trained on 28 x 28 images."""

    def load_context(self, context) -> None:
        self.classifier = load_model(context.artifacts[WEIGHTS_ARTIFACT])
        if self.classifier.config["input_size"] != IMAGE_SHAPE[1]:
            raise ValueError(f"the model reads rows of {self.classifier.config['input_size']} "
                             f"pixels; this MLflow model is for 28 x 28 images")

    # The pd.DataFrame hint is what MLflow 3 wants to see in order not to warn, on every
    # load, "Add type hints to the `predict` method"; it infers no signature from it.
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None
                ) -> np.ndarray:
        """model_input: DataFrame (or, called directly, a 2-D integer ndarray) of raw pixels,
        see the module docstring -> int64 ndarray (N,) of predicted digits."""
        return predict_digits(self.classifier, model_input)


def model_signature() -> ModelSignature:
    """784 ``long`` columns pixel0..pixel783 in, an int64 tensor (N,) out: what
    ``mlflow.models.infer_signature(images_frame(x), digits)`` infers (the tests check it)."""
    return ModelSignature(inputs=Schema([ColSpec("long", c) for c in PIXEL_COLUMNS]),
                          outputs=Schema([TensorSpec(np.dtype(np.int64), (-1,))]))


def pip_requirements() -> list[str]:
    """The installed versions of what the model imports, pinned (birnn is shipped inside)."""
    return [f"{package}=={package_version(package)}" for package in REQUIREMENTS]


# ------------------------------------------------------------------------- tracking
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No progress bars and no INFO chatter ("Validating input example against model
    signature") from MLflow on a stage's stderr, which is kept for errors; its warnings still
    show."""
    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    saved_level = pyfunc_log.level
    saved_bar = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    pyfunc_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        pyfunc_log.setLevel(saved_level)
        if saved_bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = saved_bar


# What mlflow.register_model prints to stderr on success; a stage's stderr is kept for errors
# (the caller logs the version). Anything else it prints is passed on.
_REGISTRY_CHATTER = re.compile(r"Successfully registered model |Registered model .* already "
                               r"exists\. Creating a new version|Created version '")


@contextlib.contextmanager
def _without_registry_chatter() -> Iterator[None]:
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    finally:
        kept = [line for line in captured.getvalue().splitlines(keepends=True)
                if not _REGISTRY_CHATTER.match(line)]
        sys.stderr.write("".join(kept))


@contextlib.contextmanager
def store_of(client) -> Iterator[None]:
    """``client``'s store as MLflow's tracking URI for the block: MLflow's fluent API, which
    logs and registers models, reads it. ``mlflow.set_tracking_uri`` also sets
    $MLFLOW_TRACKING_URI, which the pipeline reads for its default store, so both are put back
    after (a second task in the same process, a notebook's, must not inherit this store)."""
    saved_uri, saved_env = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_uri)
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


@contextlib.contextmanager
def _in_run(client, run_id: str) -> Iterator[None]:
    """Run ``run_id`` as MLflow's active run for the block, then its status (and a finished
    run's end time) as before. ``mlflow.start_run(run_id=...)`` resumes a run as RUNNING and
    ``mlflow.end_run`` ends it: a training run must stay RUNNING until its stage ends it, and
    a finished run (evaluate logs into training runs) keeps the status and end time it had."""
    before = client.get_run(run_id).info
    mlflow.start_run(run_id=run_id)
    try:
        yield
    finally:
        mlflow.end_run(status=before.status)   # pops the active run; writes this status
        if before.end_time is not None:
            client.set_terminated(run_id, before.status, end_time=before.end_time)


def log_model(client, run_id: str, model_file: str | Path, *, name: str = "model",
              input_example: Any = None, registered_model_name: str | None = None,
              params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None,
              step: int = 0, await_registration_for: int = 60):
    """Log the parameters in ``model_file`` (an .npz of ``RNNClassifier.save``) as an MLflow
    Model of run ``run_id`` (``mlflow.pyfunc.log_model``, models from code: this file), optionally
    registered as a new version of ``registered_model_name``; return MLflow's ``ModelInfo``
    (``model_id``, ``model_uri`` ``models:/<model_id>``, ``registered_model_version``).

    client: an ``MlflowClient`` (or the pipeline's wrapper of one): its store is written to,
        and is MLflow's tracking URI while logging (:func:`store_of`). The run's status is unchanged
        (RUNNING stays RUNNING; a finished run keeps its status and end time).
    name: the LoggedModel's name, and the path of ``runs:/<run_id>/<name>``; give every
        model of one run its own name (say "best" and "last").
    input_example: a few images, (N, 28, 28) or (N, 784) raw pixels 0..255 or an
        :func:`images_frame`; stored with the model (the UI shows it; MLflow runs the
        model on it once while logging, and writes serving_input_example.json). The
        signature is logged either way (:func:`model_signature`).
    params: LoggedModel params, on top of the run's params, which ``mlflow.pyfunc.log_model``
        copies so the Models tab can show them.
    tags: LoggedModel tags, on top of ``birnn.kind`` and ``birnn.param_count``.
    step: the run step the model is recorded at. The run's metrics logged at this step are
        attached to the model too (MLflow does it).
    await_registration_for: seconds to wait for the new version to be READY (immediate with
        a database store).
    """
    model_file = Path(model_file)
    classifier = load_model(model_file)                 # fails early on a bad file
    example = None if input_example is None else images_frame(input_example)
    model_tags = {"birnn.kind": classifier.config["kind"],
                  "birnn.param_count": str(classifier.param_count()["total"]),
                  **{k: str(v) for k, v in (tags or {}).items()}}
    with store_of(client), _in_run(client, run_id), _quiet():
        info = mlflow.pyfunc.log_model(
            name=name, python_model=str(Path(__file__).resolve()), step=step,
            artifacts={WEIGHTS_ARTIFACT: str(model_file.resolve())},
            code_paths=[str(Path(birnn.__file__).resolve().parent)],
            signature=model_signature(), input_example=example,
            pip_requirements=pip_requirements(),
            params={k: str(v) for k, v in (params or {}).items()}, tags=model_tags,
            model_type="birnn",
            metadata={"birnn_config": dict(classifier.config),
                      "param_count": classifier.param_count()["total"],
                      "input": "DataFrame, int columns pixel0..pixel783: raw pixels 0..255 "
                               "of 28x28 images, row-major, one image per row",
                      "output": "int64 predicted digit per row"})
    if registered_model_name is not None:
        version = register_model(client, info.model_id, registered_model_name,
                                 await_registration_for=await_registration_for)
        info.registered_model_version = int(version.version)
    return info


def log_model_metrics(client, model_id: str, metrics: Mapping[str, float], *, step: int = 0,
                      run_id: str | None = None, dataset_name: str | None = None,
                      dataset_digest: str | None = None, timestamp_ms: int | None = None
                      ) -> None:
    """Attach ``metrics`` (say the test loss and accuracy) to logged model ``model_id``, so
    MLflow 3's Models tab (and ``client.get_logged_model(id).metrics``) shows them.

    MLflow keeps a model's metric as a run metric that names the model, so the values are
    written, in one request, to ``run_id`` (default: the model's source run) as well. Use this
    INSTEAD of logging the same values to that run separately: a second write at the same
    step with another timestamp adds a second point to the run's history (with the same
    ``timestamp_ms``, step and value MLflow drops the run-side duplicate).
    dataset_name, dataset_digest: the data the metrics were measured on (both or neither),
    shown next to the metrics in the UI, e.g. "mnist-test" and the prepared data's sha256.
    """
    from mlflow.entities import Metric

    if run_id is None:
        run_id = client.get_logged_model(model_id).source_run_id
        if run_id is None:
            raise ValueError(f"logged model {model_id} has no source run: pass run_id")
    timestamp_ms = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    client.log_batch(run_id, metrics=[
        Metric(key, float(value), timestamp_ms, step, model_id=model_id,
               dataset_name=dataset_name, dataset_digest=dataset_digest)
        for key, value in metrics.items()])


def register_model(client, model_id: str, name: str, await_registration_for: int = 60):
    """Register logged model ``model_id`` as a new version of registered model ``name``
    (created if needed); return the ``ModelVersion``. (What ``log_model`` does when given
    ``registered_model_name``, for a model chosen after logging, e.g. once tested.)"""
    with store_of(client), _without_registry_chatter():
        return mlflow.register_model(f"models:/{model_id}", name,
                                     await_registration_for=await_registration_for)


def set_alias(client, name: str, version: int | str, alias: str = BOOK_ALIAS) -> str:
    """Point ``alias`` of registered model ``name`` at ``version`` (moving it from any other
    version); return the model URI ``models:/<name>@<alias>`` to load or serve."""
    client.set_registered_model_alias(name, alias, str(version))
    return f"models:/{name}@{alias}"


# Models from code: when MLflow runs this file as the model's code (at logging, loading and
# serving time), this is the object it takes as the model. Importing the module only sets
# that (unloaded) instance as MLflow's "model set from code", which nothing else reads.
mlflow.models.set_model(DigitClassifier())
