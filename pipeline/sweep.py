"""A sweep job's identity and its place in MLflow (the design is in pipeline.tracking's docstring).

    python -m pipeline.train -m model=uni,bi train.seed=0,1,2,3,4 hydra/launcher=joblib
    python -m pipeline.compare sweep=<id>          (the id is printed when the sweep ends)

``-m`` runs every combination as its own job (Hydra's multirun). ``hydra/launcher=joblib``
(the hydra-joblib-launcher plugin's own config) runs them in parallel processes on this
machine, as many at a time as there are cores (its n_jobs defaults to -1; set
``hydra.launcher.n_jobs=<n>`` to change it); without it they run one after another.

Every job of one sweep shares ``hydra.sweep.dir``; the sweep's id is that path without a
leading ``multirun/`` and with ``/`` replaced by ``_`` (Hydra's default
``multirun/2026-11-28/12-34-56`` gives ``2026-11-28_12-34-56``; ``hydra.sweep.dir=multirun/seeds``
gives ``seeds``). It is computed from the configured string, not from an absolute path, so
that processes started elsewhere (launcher workers, other machines) compute the same one. A
sweep directory serves one sweep: starting another in it is refused.

A job writes its model files under its own output directory (``<sweep dir>/<job number>/``),
never into models/, so parallel jobs cannot overwrite each other or the DVC pipeline's models.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from pipeline import tracking
from pipeline.cli import StageError

log = logging.getLogger(__name__)

SWEEP_TAG = "sweep_id"
ROLE_TAG = "sweep_role"  # "parent" or "job"
JOB_TAG = "sweep_job"  # the job's number in the sweep (Hydra's hydra.job.num)
SWEPT_TAG = "swept_keys"  # on the parent: JSON list of the keys the sweep varies


def sweep_id(sweep_dir: str) -> str:
    parts = [part for part in PurePosixPath(str(sweep_dir)).parts if part not in ("/", ".")]
    if len(parts) > 1 and parts[0] == "multirun":
        parts = parts[1:]
    identifier = "_".join(parts)
    if not identifier or "'" in identifier or '"' in identifier:
        raise StageError(f"hydra.sweep.dir: {sweep_dir!r} gives no usable sweep id "
                         "(it must be a non-empty path without quotes)")
    return identifier


def override_key(override: str) -> str:
    """'train.seed=3' -> 'train.seed'; 'model=bi' -> 'model' (Hydra's own parser)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(override).key_or_group


def swept_keys(overrides: list[str]) -> list[str]:
    """The keys a sweep's command line varies: ['model', 'train.seed'] for
    ``model=uni,bi train.seed=range(0,5) experiment=quick``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return [o.key_or_group for o in OverridesParser.create().parse_overrides(list(overrides))
            if o.is_sweep_override()]


def check_id(identifier: str, key: str = "sweep") -> str:
    """A sweep id typed by a user, safe to put into an MLflow filter string."""
    identifier = str(identifier).strip()
    if not identifier or "'" in identifier or '"' in identifier:
        raise StageError(f"{key}: {identifier!r} is not a sweep id (ids have no quotes)")
    return identifier


def parent_filter(identifier: str) -> str:
    return f"tags.{SWEEP_TAG} = '{identifier}' and tags.{ROLE_TAG} = 'parent'"


def jobs_filter(identifier: str) -> str:
    return f"tags.{SWEEP_TAG} = '{identifier}' and tags.{ROLE_TAG} = 'job'"


def find_parent(client, identifier: str):
    """The sweep's parent run, or None. Several (a reused sweep directory on a store the
    start hook did not see) would be an error: it names them."""
    parents = tracking.search_runs(client, parent_filter(identifier))
    if len(parents) > 1:
        ids = ", ".join(run.info.run_id for run in parents)
        raise StageError(f"sweep {identifier!r} has {len(parents)} parent runs ({ids}): "
                         "use a new hydra.sweep.dir for every sweep")
    return parents[0] if parents else None


@dataclass(frozen=True)
class Job:
    """One job of a sweep, as Hydra describes it to the process running it."""

    sweep_id: str
    num: int
    output_dir: Path  # <sweep dir>/<job number>/, absolute
    overrides: tuple[str, ...]  # this job's command-line overrides, e.g. ("model=uni", "train.seed=3")

    def run_name(self, name: str, parent) -> str:
        """'uni train.seed=3': the model, then this job's values of the keys the sweep varies
        (all its overrides if there is no parent run to say which)."""
        swept = json.loads(parent.data.tags.get(SWEPT_TAG, "null")) if parent else None
        shown = [o for o in self.overrides
                 if override_key(o) != "model" and (swept is None or override_key(o) in swept)]
        return " ".join([name, *shown])[:250]

    def tags(self, parent) -> dict[str, str]:
        tags = {SWEEP_TAG: self.sweep_id, ROLE_TAG: "job", JOB_TAG: str(self.num),
                "hydra_overrides": json.dumps(list(self.overrides))}
        if parent is not None:
            tags[tracking.PARENT_TAG] = parent.info.run_id
        return tags

    def find_run(self, client):
        """This job's run, if it got as far as creating one."""
        runs = tracking.search_runs(
            client, f"{jobs_filter(self.sweep_id)} and tags.{JOB_TAG} = '{self.num}'")
        return runs[0] if runs else None


def current_job() -> Job | None:
    """The job this process runs, or None for a single run (no ``-m``)."""
    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN:
        return None
    return Job(sweep_id=sweep_id(hydra.sweep.dir), num=int(hydra.job.num),
               output_dir=Path(hydra.runtime.output_dir),
               overrides=tuple(hydra.overrides.task))


def parent_run(client, job: Job):
    """The parent run of ``job``'s sweep, or None (with a warning) if there is none."""
    parent = find_parent(client, job.sweep_id)
    if parent is None:  # the start hook did not run (hydra.callbacks removed): tag only
        log.warning("sweep %s has no parent run: this job's run is tagged but not nested",
                    job.sweep_id)
    return parent


def record_failed_job(cfg: DictConfig, error: str, script: str) -> None:
    """After a job failed: make sure MLflow shows it as a FAILED run with ``error``.

    A failure inside the training run has already marked that run FAILED; a failure before it
    existed (a configuration value the schema rejects, missing data) gets a FAILED run of its
    own, with the job's configuration as params, so that the sweep still has one run per job.
    """
    job = current_job()
    client = tracking.connect(cfg.tracking)
    if job.find_run(client) is not None:
        return
    experiment = tracking.experiment_id(client, cfg.tracking.experiment_name)
    kind = str(cfg.model.kind)
    parent = parent_run(client, job)
    run = client.create_run(experiment, run_name=job.run_name(kind, parent),
                            tags={**tracking.source_tags(script), **job.tags(parent),
                                  "stage": "train", "model_kind": kind})
    try:
        params = tracking.flatten(cfg)
    except Exception:  # the failure may be an interpolation that does not resolve
        params = {}
    tracking.log_params(client, run.info.run_id, params)
    tracking.end_failed(client, run.info.run_id, error)
