"""A sweep job's identity (sweep id, job number, overrides) and its place in MLflow: the
tags that group a sweep's runs and nest them under its parent run.

The sweep id is the configured ``hydra.sweep.dir`` without a leading ``multirun/``, ``/``
replaced by ``_`` (docs/architecture.md, "Sweeps"). Ids are plain folder names (letters, digits,
``.``, ``_``, ``-``) that a shell and Hydra read back unchanged; two sweep folders that give
one id are refused.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from pipeline.guard.errors import StageError
from pipeline.tracking import runs, store

log = logging.getLogger(__name__)

SWEEP_TAG = "sweep_id"
ROLE_TAG = "sweep_role"  # "parent" or "job"
JOB_TAG = "sweep_job"  # the job's number in the sweep (Hydra's hydra.job.num)
SWEPT_TAG = "swept_keys"  # on the parent: JSON list of the keys the sweep varies
TOTAL_TAG = "sweep_jobs_total"  # on the parent: how many jobs the command line makes
SEARCH_SPACE_TAG = "search_space"  # on a search's parent: JSON of hydra.sweeper.params
SAMPLER_TAG = "search_sampler"  # on a search's parent: 'TPESampler seed=0 ...'


# A sweep id names reports/sweeps/<id>/ and goes into MLflow filter strings and the printed
# report command: no path separator, no quote, no '..', nothing a shell would expand.
_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def _id_problem(identifier: str) -> str | None:
    if not identifier:
        return "is empty"
    if ".." in identifier:
        return "contains '..'"
    if "/" in identifier or "\\" in identifier:
        return "contains a path separator"
    if not _ID.fullmatch(identifier):
        return "has characters other than letters, digits, '.', '_', '-', or starts with '.'"
    return None


def sweep_id(sweep_dir: str) -> str:
    parts = [part for part in PurePosixPath(str(sweep_dir)).parts if part not in ("/", ".")]
    if ".." in parts:
        raise StageError(f"hydra.sweep.dir: {sweep_dir!r} contains '..': name the sweep's "
                         "folder directly")
    if len(parts) > 1 and parts[0] == "multirun":
        parts = parts[1:]
    identifier = "_".join(parts)
    problem = _id_problem(identifier)
    if problem:
        raise StageError(f"hydra.sweep.dir: {sweep_dir!r} gives no usable sweep id: "
                         f"{identifier!r} {problem}")
    return identifier


def check_new_sweep(client, identifier: str, sweep_dir: str) -> None:
    """Refuse an id already taken: by an earlier sweep in the same folder, or by one in another
    folder that gives the same id (``multirun/a/b`` and ``multirun/a_b`` both give ``a_b``)."""
    existing = find_parent(client, identifier)
    if existing is None:
        return
    theirs = existing.data.tags.get("sweep_dir")
    if theirs and theirs != str(Path(sweep_dir).resolve()):
        raise StageError(f"hydra.sweep.dir: {sweep_dir!r} gives the sweep id {identifier!r}, "
                         f"already taken by the sweep in {theirs} (parent run "
                         f"{existing.info.run_id}): choose another hydra.sweep.dir")
    raise StageError(f"sweep {identifier!r} already exists (parent run "
                     f"{existing.info.run_id}): give this sweep its own hydra.sweep.dir")


def _for_hydra(identifier: str) -> str:
    """``identifier`` as a Hydra value that reads back as this string: quoted if Hydra would
    read it as something else (``007`` as the int 7, ``1e3``, ``true``, ``null``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    value = OverridesParser.create().parse_override(f"sweep={identifier}").value()
    return identifier if value == identifier and isinstance(value, str) else f"'{identifier}'"


def report_command(sweep_ids: list[str]) -> str:
    """The command that reports these sweeps, quoted so that it works when pasted."""
    values = [_for_hydra(identifier) for identifier in sweep_ids]
    override = "sweep=" + (values[0] if len(values) == 1 else f"[{','.join(values)}]")
    if "'" in override:
        override = f'"{override}"'
    elif "[" in override:
        override = f"'{override}'"
    return f"python -m pipeline.commands.sweep_report {override}"


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


def count_jobs(overrides: list[str]) -> int | None:
    """How many jobs Hydra's basic sweeper makes of these overrides (the product of the swept
    values' counts); None when that is not known in advance (an Optuna interval, say)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    total = 1
    try:
        for override in OverridesParser.create().parse_overrides(list(overrides)):
            if override.is_sweep_override():
                total *= len(list(override.sweep_string_iterator()))
    except Exception:
        return None
    return total


def sweep_overrides(hydra_cfg) -> list[str]:
    """The overrides that define a sweep: the sweeper's own ``params`` (an Optuna search
    space, or sweeps configured for the basic sweeper), then the command line's."""
    params = hydra_cfg.sweeper.get("params") or {}
    return [f"{key}={value}" for key, value in params.items()] + list(hydra_cfg.overrides.task)


def planned_jobs(hydra_cfg) -> int | None:
    """How many jobs a sweep will run: the sweeper's ``n_trials`` if it has one (Optuna),
    else the product of the swept values' counts."""
    trials = hydra_cfg.sweeper.get("n_trials")
    return int(trials) if trials is not None else count_jobs(sweep_overrides(hydra_cfg))


def search_tags(hydra_cfg) -> dict[str, str]:
    """What a search's parent run records of its sweeper (Optuna: a sampler, n_trials and a
    search space), so that a report can say how it was searched; {} for a grid sweep."""
    sweeper = hydra_cfg.sweeper
    if sweeper.get("sampler") is None:
        return {}
    sampler = sweeper.sampler
    settings = " ".join(f"{key}={sampler[key]}" for key in ("seed", "n_startup_trials")
                        if key in sampler)
    return {SEARCH_SPACE_TAG: json.dumps({str(k): str(v) for k, v
                                          in (sweeper.get("params") or {}).items()}),
            SAMPLER_TAG: (f"{str(sampler.get('_target_')).rsplit('.', 1)[-1]} {settings}, "
                          f"{sweeper.get('n_trials')} trials, {sweeper.get('direction')}")}


def log_progress(client, identifier: str) -> None:
    """'sweep <id>: 7 of 40 jobs done': one line, at the end of every job."""
    parent = find_parent(client, identifier)
    total = parent.data.tags.get(TOTAL_TAG, "?") if parent is not None else "?"
    done = [run for run in runs.search_runs(client, jobs_filter(identifier))
            if run.info.status != "RUNNING"]
    log.info("sweep %s: %d of %s jobs done", identifier, len(done), total)


def check_id(value, key: str = "sweep") -> str:
    """A sweep id typed by a user: a plain folder name, safe to put into an MLflow filter
    string and under reports/sweeps/."""
    if not isinstance(value, str):  # Hydra read it as a number, a boolean or null
        raise StageError(f"{key}: Hydra read {value!r} as {type(value).__name__}, not as a "
                         f"sweep id: quote an id that looks like one (\"{key}='<id>'\")")
    identifier = value.strip()
    problem = _id_problem(identifier)
    if problem:
        raise StageError(f"{key}: {identifier!r} is not a sweep id: it {problem}")
    return identifier


def parent_filter(identifier: str) -> str:
    return f"tags.{SWEEP_TAG} = '{identifier}' and tags.{ROLE_TAG} = 'parent'"


def jobs_filter(identifier: str) -> str:
    return f"tags.{SWEEP_TAG} = '{identifier}' and tags.{ROLE_TAG} = 'job'"


def find_parent(client, identifier: str):
    """The sweep's parent run, or None. Several (a reused sweep directory on a store the
    start hook did not see) would be an error: it names them."""
    parents = runs.search_runs(client, parent_filter(identifier))
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
        """'uni-mnist-seed3 model.lr=0.02': ``name`` (which says the model, dataset and seed),
        then this job's values of the other keys the sweep varies (all its other overrides if
        there is no parent run to say which)."""
        swept = json.loads(parent.data.tags.get(SWEPT_TAG, "null")) if parent else None
        named = ("model", "dataset", "train.seed")
        shown = [o for o in self.overrides if override_key(o) not in named
                 and (swept is None or override_key(o) in swept)]
        return " ".join([name, *shown])[:250]

    def tags(self, parent) -> dict[str, str]:
        tags = {SWEEP_TAG: self.sweep_id, ROLE_TAG: "job", JOB_TAG: str(self.num),
                "hydra_overrides": json.dumps(list(self.overrides))}
        if parent is not None:
            tags[runs.PARENT_TAG] = parent.info.run_id
        return tags

    def find_run(self, client):
        """This job's run, if it got as far as creating one."""
        found = runs.search_runs(
            client, f"{jobs_filter(self.sweep_id)} and tags.{JOB_TAG} = '{self.num}'")
        return found[0] if found else None


def current_job() -> Job | None:
    """The job this process runs, or None for a single run (no ``-m``)."""
    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN:
        return None
    return Job(sweep_id=sweep_id(hydra.sweep.dir), num=int(hydra.job.num),
               output_dir=Path(hydra.runtime.output_dir),
               overrides=tuple(hydra.overrides.task))


def run_identity(client, name: str, tags: dict[str, str]) -> tuple[str, dict[str, str]]:
    """A run's name and tags: ``name`` and ``tags`` for a single run; a sweep job's run is named
    by its swept values and tagged (nested) as one of its sweep's jobs."""
    job = current_job()
    if job is None:
        return name, tags
    parent = parent_run(client, job)
    return job.run_name(name, parent), {**tags, **job.tags(parent)}


def parent_run(client, job: Job):
    """The parent run of ``job``'s sweep, or None (with a warning) if there is none."""
    parent = find_parent(client, job.sweep_id)
    if parent is None:  # the start hook did not run (hydra.callbacks removed): tag only
        log.warning("sweep %s has no parent run: this job's run is tagged but not nested",
                    job.sweep_id)
    return parent


EXPERIMENT_KEYS = ("model", "train", "dataset")  # what a failed job's run records as params


def record_failed_job(cfg: DictConfig, error: str, script: str) -> None:
    """After a job failed: make sure MLflow shows it as a FAILED run with ``error``.

    A failure inside the training run has already marked that run FAILED; a failure before it
    existed (a configuration value the schema rejects, missing data) gets a FAILED run of its
    own, with the job's experiment settings (model.*, train.*, dataset) as params, so that the
    sweep still has one run per job; infrastructure (tracking, paths) is left out, as for
    training runs.
    """
    job = current_job()
    client = store.connect(cfg.tracking)
    if job.find_run(client) is not None:
        return
    experiment = store.experiment_id(client, cfg.tracking.experiment_name)
    kind = str(cfg.model.kind)
    parent = parent_run(client, job)
    try:
        name = runs.training_run_name(kind, cfg.dataset, cfg.train.seed)
    except Exception:  # the failure may be a value that does not resolve
        name = kind
    run = client.create_run(experiment, run_name=job.run_name(name, parent),
                            tags={**runs.source_tags(script), **job.tags(parent),
                                  "stage": "train", "model_kind": kind,
                                  runs.NOTE_TAG: f"Job {job.num} of sweep `{job.sweep_id}`: "
                                  f"it failed before its training started ({error[:1000]})."})
    params = {}
    for key in EXPERIMENT_KEYS:
        try:
            params.update(runs.flatten({key: cfg[key]}))
        except Exception:  # the failure may be an interpolation that does not resolve
            continue
    runs.log_params(client, run.info.run_id, params)
    runs.end_failed(client, run.info.run_id, error)
