"""Runs: creating one and ending it however the stage ends, its source tags and params, the
link from a model folder to its run, grouping runs under a parent, and searching."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping

from omegaconf import DictConfig, OmegaConf

from birnn import numerics
from pipeline.guard import interrupts
from pipeline.guard.errors import StageError, one_line
from pipeline.files import read_json
from pipeline.paths import PROJECT_ROOT
from pipeline.tracking.stale_runs import process_tags
from pipeline.tracking.store import StoreUnavailable, experiment_id

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"  # the UI nests a run under the run named here
COMPARED_TAG = "compared_run_ids"
LOGGED_MODEL_TAG = "logged_model"  # the name of the run's logged model (runs:/<run id>/<name>)
REPORT_TAG = "report_run_id"  # a training run's table 19-12 report (a link, not a parent)
ERROR_TAG = "error"
CODE_AND_CONFIG = ("birnn", "pipeline", "conf", "dvc.yaml", "params.yaml")


def source_tags(script: str | os.PathLike | None = None) -> dict[str, str]:
    """What the UI shows as the run's source: the stage module, the code's git commit and
    whether code or configuration differ from it (``git_dirty``; files the pipeline itself
    rewrites, such as dvc.lock and metrics/, do not count). The client API, unlike
    mlflow.start_run, sets none of these by itself.

    ``script`` is the stage's file; by default the script that was started, which is right
    for a single run but not for a sweep job that a launcher runs in a worker process (whose
    sys.argv[0] is the launcher's own entry point). Also the process that owns the run
    (host, pid, start time), so that a later command can end it if the process dies hard,
    and the numerics it ran (birnn.numerics: pinned or not, BLAS kernel, numpy dispatch, CPU)."""
    script = Path(script if script is not None else sys.argv[0]).resolve()
    source = script.relative_to(PROJECT_ROOT) if script.is_relative_to(PROJECT_ROOT) else script
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": str(source), **process_tags(),
            **numerics.current().tags()}

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()

    try:
        tags["mlflow.source.git.commit"] = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--", *CODE_AND_CONFIG)
        tags["git_dirty"] = str(bool(changed)).lower()
    except (OSError, subprocess.SubprocessError):
        pass  # not a git checkout (an exported tarball, say): no commit to record
    return tags


def flatten(config: Mapping[str, Any] | DictConfig, prefix: str = "") -> dict[str, str]:
    """{'model': {'lr': 0.01}} -> {'model.lr': '0.01'}: the resolved config as MLflow params."""
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, prefix=f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(value)
        else:
            flat[name] = "{}" if isinstance(value, Mapping) else str(value)
    return flat


def log_params(client, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    client.log_batch(run_id, params=[Param(key, str(value)) for key, value in params.items()])


@contextlib.contextmanager
def new_run(client, experiment: str, run_name: str, tags: Mapping[str, str],
        script: str | os.PathLike | None = None) -> Iterator[str]:
    """Create a run in experiment ``experiment`` (a name; created if needed) and yield its id;
    end it FINISHED, or FAILED with the error as a tag. KeyboardInterrupt (Ctrl-C, and SIGTERM
    or SIGHUP: pipeline.guard.interrupts) ends it KILLED.
    The error is re-raised for the stage to report. ``script``: see :func:`source_tags`.
    """
    created = client.create_run(experiment_id(client, experiment), run_name=run_name,
                                tags={**source_tags(script), **tags})
    run_id = created.info.run_id
    log.info("MLflow run %s (%s) in experiment %r", run_id, run_name, experiment)
    try:
        yield run_id
        interrupts.raise_if_lost()  # a stop signal that Python dropped on the way
    except KeyboardInterrupt as exc:
        end_killed(client, run_id, str(exc) or "interrupted")
        raise
    except BaseException as exc:
        end_failed(client, run_id, " ".join(str(exc).split()) or type(exc).__name__)
        raise
    client.set_terminated(run_id, "FINISHED")


def end_failed(client, run_id: str, error: str) -> None:
    """Mark a run FAILED with ``error`` in its ``error`` tag."""
    _end(client, run_id, "FAILED", error)


def end_killed(client, run_id: str, reason: str = "interrupted") -> None:
    """Mark a run KILLED (Ctrl-C, a signal), as :func:`new_run` does for its own runs."""
    _end(client, run_id, "KILLED", reason)


def _end(client, run_id: str, status: str, error: str) -> None:
    try:
        client.set_tag(run_id, ERROR_TAG, error[:5000])
        client.set_terminated(run_id, status)
    except Exception as exc:  # the store may be what failed; the original error matters more
        log.warning("could not mark run %s %s: %s", run_id, status, exc)


class RunIncomplete(StageError):
    """A stage's outputs are written, but its run could not be completed in the store."""


@contextlib.contextmanager
def completing(run_id: str, kept: str, rerun: str) -> Iterator[None]:
    """Around the tracking that follows work whose outputs (``kept``) are already written: a
    store that fails here (it stopped answering, say) costs none of that work; the failure
    becomes one line saying so and how to record the run (``rerun``)."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except (StoreUnavailable, MlflowException) as exc:
        raise RunIncomplete(f"run {run_id} could not be completed: {one_line(exc)[:400]}; "
                            f"{kept}; to record the run, rerun when the tracking store "
                            f"answers: {rerun}") from None


NOTE_TAG = "mlflow.note.content"  # the run's description: Markdown on its page in the UI


def set_description(client, run_id: str, markdown: str) -> None:
    """The run's description (its page renders it as Markdown); cut to MLflow's 8,000
    characters for a tag value."""
    if len(markdown) > 8000:
        markdown = markdown[:7900].rsplit("\n", 1)[0] + "\n\n(cut at MLflow's length limit)"
    client.set_tag(run_id, NOTE_TAG, markdown)


def dataset_digest(fingerprint: str) -> str:
    """A dataset's digest as MLflow stores it: at most 36 characters (PostgreSQL enforces
    it), so a longer fingerprint (a sha256) is cut to its first 16."""
    return fingerprint if len(fingerprint) <= 36 else fingerprint[:16]


def log_data_inputs(client, run_id: str, source: str, fingerprint: str,
                    datasets: Mapping[str, tuple[str, int]]) -> None:
    """Record the data a run used as its MLflow inputs (the UI's Dataset column and lineage):
    ``datasets`` maps a context ('train', 'validation', 'test') to the dataset's name and
    number of rows, all read from ``source`` (a relative path) and identified by
    :func:`dataset_digest` of ``fingerprint``. Each is an ``mlflow.data`` meta dataset (the
    data itself stays in its files), its row count as its profile."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.exceptions import MlflowException
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    digest = dataset_digest(fingerprint)
    inputs = []
    for context, (name, rows) in datasets.items():
        described = MetaDataset(LocalArtifactDatasetSource(source), name=name, digest=digest)
        inputs.append(DatasetInput(
            Dataset(**described.to_dict(), profile=json.dumps({"num_rows": rows})),
            tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    try:
        client.log_inputs(run_id, datasets=inputs)
    except MlflowException as exc:
        # Parallel sweep jobs log the same dataset at once; MLflow's SQL store looks for it,
        # then inserts it, so one insert can hit the other's row (PostgreSQL: "dataset_pk").
        # The transaction was rolled back and the dataset now exists: once more links it.
        text = str(exc)
        if "dataset" not in text or not ("duplicate key" in text or "UNIQUE" in text):
            raise
        client.log_inputs(run_id, datasets=inputs)


WEIGHT_FILES = ("best.npz", "last.npz")


def weights_digest(model_dir: Path) -> dict[str, str]:
    """The sha256 of each weight file: run.json records them, so that a run.json left beside
    other weights (DVC restores a model folder without it: .dvcignore) is caught."""
    return {name: hashlib.sha256((model_dir / name).read_bytes()).hexdigest()
            for name in WEIGHT_FILES if (model_dir / name).is_file()}


def read_run_info(model_dir: Path, dataset: str) -> dict:
    """models/<dataset>/<name>/run.json, written by the train stage: which run holds this
    model, checked to describe the weights beside it."""
    retrain = (f"python -m pipeline.stages.train dataset={dataset} model={model_dir.name}")
    info = read_json(model_dir / "run.json", hint=f"train this model first ({retrain})",
                     shape={"run_id": str})
    recorded = info.get("weights_sha256")  # (absent in a run.json of before it was recorded)
    if recorded is not None and recorded != weights_digest(model_dir):
        raise StageError(f"{model_dir / 'run.json'}: describes run {info['run_id']}'s weights, "
                         f"not the ones in {model_dir} (another training wrote them, or "
                         f"they were restored without it): retrain it ({retrain})")
    return info


WEIGHTS_TAGS = {"best.npz": "weights_sha256_best", "last.npz": "weights_sha256_last"}
EVALUATION_STAGE = "evaluate"  # the stage tag of a run that records an evaluation only


def linked_run_info(model_dir: Path) -> tuple[dict | None, str]:
    """models/<dataset>/<name>/run.json if it describes the weights beside it, else None and
    why not. run.json is local bookkeeping outside DVC (.dvcignore): a model folder restored
    by DVC (dvc pull, a queued experiment's copy, an old commit checked out) has none, or
    the one of other weights. A run.json that is there but unreadable is an error."""
    path = model_dir / "run.json"
    if not path.exists():
        return None, "no run.json beside it (DVC restores a model folder without one)"
    info = read_json(path, hint="delete it, or retrain the model", shape={"run_id": str})
    recorded = info.get("weights_sha256")  # (absent in a run.json of before it was recorded)
    if recorded is not None and recorded != weights_digest(model_dir):
        return None, (f"its run.json describes run {info['run_id']}'s weights, not these "
                      "(another training wrote them, or DVC restored them without it)")
    return info, ""


def find_run(client, run_id: str):
    """The run ``run_id`` and "" if the store holds it, not deleted; else None and why not."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None, f"its training run {run_id} is not in tracking store {client.tracking_uri}"
    if run.info.lifecycle_stage == "deleted":
        return None, (f"its training run {run_id} is deleted in tracking store "
                      f"{client.tracking_uri} (restore it with MLFLOW_TRACKING_URI="
                      f"{client.tracking_uri} mlflow runs restore --run-id {run_id} to record "
                      "there)")
    return run, ""


def weights_tags(digest: Mapping[str, str]) -> dict[str, str]:
    """The tags that name a model by its weights: the sha256 of best.npz and last.npz."""
    return {tag: digest[name] for name, tag in WEIGHTS_TAGS.items() if name in digest}


def find_evaluation_run(client, experiment: str, digest: Mapping[str, str], dataset: str,
                        data_sha256: str | None = None):
    """The newest finished run of experiment ``experiment`` (a name) that records an
    evaluation of the weights ``digest`` (:func:`weights_digest`) on ``dataset`` (and on the
    prepared data ``data_sha256``, if given): what evaluate made for a model whose training
    run is not in this store. None if there is none."""
    found = client.get_experiment_by_name(experiment)
    tags = weights_tags(digest)
    if found is None or found.lifecycle_stage == "deleted" or len(tags) != len(WEIGHTS_TAGS):
        return None
    wanted = {**tags, "stage": EVALUATION_STAGE, "dataset": dataset,
              **({"data_sha256": data_sha256} if data_sha256 else {})}
    query = " and ".join([*(f"tags.{key} = '{value}'" for key, value in wanted.items()),
                          "attributes.status = 'FINISHED'"])
    page = client.search_runs([found.experiment_id], filter_string=query, max_results=1,
                              order_by=["attributes.start_time DESC"])
    return page[0] if page else None


def require_run(client, run_id: str, where: str, retrain: str = "retrain the model"):
    """The run ``run_id`` (named in file ``where``) from the store, or a one-line StageError.
    A deleted run is refused too: results written into it would vanish from the UI, and go
    with it when the store is cleaned (``mlflow gc``). ``retrain``: the other remedy."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise StageError(f"{where}: run {run_id} is not in tracking store "
                         f"{client.tracking_uri} (was it trained with another tracking.uri?)") \
            from None
    if run.info.lifecycle_stage == "deleted":
        raise StageError(f"{where}: run {run_id} is deleted in tracking store "
                         f"{client.tracking_uri}: restore it (MLFLOW_TRACKING_URI="
                         f"{client.tracking_uri} mlflow runs restore --run-id {run_id}) or "
                         f"{retrain}")
    return run


def training_run_name(name: str, dataset: str, seed) -> str:
    """'bi-mnist-seed0': what a training run (and its logged model) is called, so that the
    UI's Run Name column and the Models tab say which model, data and seed."""
    return f"{name}-{dataset}-seed{seed}"


def link_report(client, report_run_id: str, compared_run_ids: list[str]) -> None:
    """Tag a report run with the runs it compared and each of those with the report. Not
    nested under it: the UI folds nested runs, and the training runs are what a user
    compares (the report's description links them)."""
    for run_id in compared_run_ids:
        client.set_tag(run_id, REPORT_TAG, report_run_id)
    client.set_tag(report_run_id, COMPARED_TAG, ",".join(compared_run_ids))


def search_runs(client, filter_string: str, experiment_ids: list[str] | None = None) -> list:
    """Every run matching ``filter_string`` in the given experiments (default: all active
    ones), following MLflow's pages (one page holds at most 1,000 runs)."""
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if not experiment_ids:
        return []
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string,
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs
