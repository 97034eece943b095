"""A sweep's runs from MLflow alone, as one table (one row per job).

Everything comes from the tracking store (tags, params, metrics), none from local files, so a
sweep whose jobs ran on other machines against the same server reads the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pandas as pd

from pipeline.guard.errors import StageError
from pipeline.metric_names import TEST_METRICS
from pipeline.reports.formatting import training_settings
from pipeline.sweeps import job as sweep
from pipeline.tracking import runs as tracked_runs

SEED_KEY = "train.seed"


@dataclass
class SweepRuns:
    sweep_ids: list[str]
    parents: list  # the sweeps' parent runs (mlflow Run), as many as were found
    jobs: pd.DataFrame  # one row per job run, see job_table
    experiment: str  # the (first) experiment's name
    training: str  # the training settings of the finished jobs, as a sentence
    dataset: str  # the dataset tag of the runs ("mnist")

    @property
    def report_id(self) -> str:
        """The report's name: the sweep id, or the ids joined by '+'."""
        return "+".join(self.sweep_ids)


def _known_sweeps(client, limit: int = 5) -> str:
    parents = tracked_runs.search_runs(client, f"tags.{sweep.ROLE_TAG} = 'parent'")
    parents.sort(key=lambda run: run.info.start_time, reverse=True)
    ids = [run.data.tags.get(sweep.SWEEP_TAG, "?") for run in parents[:limit]]
    return f"recent sweeps: {', '.join(ids)}" if ids else "the store has no sweeps"


def _overrides(run) -> dict[str, str]:
    """{'model': 'uni', 'train.seed': '3'} from the run's hydra_overrides tag."""
    listed = json.loads(run.data.tags.get("hydra_overrides", "[]"))
    return {sweep.override_key(o): o for o in listed}


def configuration_labels(runs: list) -> list[str]:
    """What distinguishes each run's configuration, besides its seed: the model kind, then
    the run's overrides of every key whose value differs between the sweep's runs
    ('uni', 'bi model.merge=concat'). Runs of one configuration share a label."""
    overrides = [_overrides(run) for run in runs]
    keys = list(dict.fromkeys(key for o in overrides for key in o))  # command-line order
    varying = [key for key in keys if key not in ("model", SEED_KEY)
               and len({o.get(key) for o in overrides}) > 1]
    return [" ".join([run.data.tags.get("model_kind", "?"),
                      *(o[key] for key in varying if key in o)])
            for run, o in zip(runs, overrides)]


def _hidden_per_chain(params: dict) -> int | None:
    """uni's hidden_size, or bi's units per chain (forward; equal to backward unless concat)."""
    value = params.get("model.hidden_size", params.get("model.hidden_fwd"))
    if value is None and "hidden_sizes" in params:  # runs logged since the shared names: "20+20"
        value = params["hidden_sizes"].split("+")[0]
    return int(value) if value is not None else None


def schedule_text(params: dict) -> str:
    """'0.005 constant' or '0.01; 0.008 from epoch 30, 0.005 from 50' (0-based epochs), from a
    run's ``model.lr`` and ``model.lr_milestones`` (the milestones in effect) params."""
    if "model.lr" not in params:
        return ""
    milestones = json.loads(params.get("model.lr_milestones") or "{}")
    if not milestones:
        return f"{params['model.lr']} constant"
    steps = sorted((int(epoch), rate) for epoch, rate in milestones.items())
    return (f"{params['model.lr']}; " + ", ".join(
        f"{rate} from {'epoch ' if i == 0 else ''}{epoch}" for i, (epoch, rate) in enumerate(steps)))


def job_table(runs: list) -> pd.DataFrame:
    labels = configuration_labels(runs)
    rows = []
    for run, label in zip(runs, labels):
        metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
        rows.append({
            "sweep": tags.get(sweep.SWEEP_TAG, "?"),
            "job": int(tags.get(sweep.JOB_TAG, -1)), "configuration": label,
            "kind": tags.get("model_kind", "?"),
            "seed": int(params.get(SEED_KEY, tags.get("seed", -1))),
            "status": run.info.status,
            "param_count": int(params["param_count"]) if "param_count" in params else None,
            "hidden": _hidden_per_chain(params), "merge": params.get("model.merge", ""),
            "dataset": tags.get("dataset", "?"),
            "schedule": schedule_text(params),
            "epochs": int(params["train.epochs"]) if "train.epochs" in params else None,
            **{key: metrics.get(key) for key in TEST_METRICS},
            "best_val_loss": metrics.get("best_val_loss"),
            "best_epoch": metrics.get("best_epoch"),
            "train_seconds": metrics.get("train_seconds"),
            "job_seconds": metrics.get("job_seconds"),
            "run_id": run.info.run_id, "error": tags.get(tracked_runs.ERROR_TAG, ""),
            # pinned, native or unpinned (birnn.numerics); empty: run made before the tag
            "numerics": tags.get("numerics", ""),
        })
    return pd.DataFrame(rows).sort_values(["sweep", "job"], kind="stable").reset_index(drop=True)


def _runs_of_one_sweep(client, sweep_id: str) -> list:
    runs = tracked_runs.search_runs(client, sweep.jobs_filter(sweep_id))
    if not runs:
        raise StageError(f"sweep={sweep_id}: no runs tagged {sweep.SWEEP_TAG}={sweep_id!r} in "
                         f"tracking store {client.tracking_uri} ({_known_sweeps(client)})")
    experiments = {run.info.experiment_id for run in runs}
    if len(experiments) > 1:
        raise StageError(f"sweep={sweep_id}: its runs are in several experiments "
                         f"({', '.join(sorted(experiments))}); a sweep tracks into one")
    for run in runs:
        missing = [key for key in TEST_METRICS if key not in run.data.metrics]
        if run.info.status == "FINISHED" and missing:
            raise StageError(f"sweep={sweep_id}: run {run.info.run_id} (job "
                             f"{run.data.tags.get(sweep.JOB_TAG)}) finished without "
                             f"{', '.join(missing)}: it was not tested on the test set")
    return runs


def fetch(client, sweep_ids: list[str]) -> SweepRuns:
    """The job runs and parents of one or more sweeps (several: e.g. a uni seed sweep and a
    bi merge-mode sweep, which one Hydra sweep cannot hold since uni has no merge), checked:
    one-line StageErrors for an unknown id, a sweep spread over several experiments, a
    finished job without test metrics, or runs of several datasets (the report compares uni
    with bi on one test set)."""
    ids = [sweep.check_id(identifier) for identifier in sweep_ids]
    runs = [run for identifier in dict.fromkeys(ids) for run in _runs_of_one_sweep(client, identifier)]
    datasets = sorted({run.data.tags["dataset"] for run in runs if "dataset" in run.data.tags})
    if len(datasets) > 1:  # (a job that failed before training has no dataset)
        raise StageError(f"sweep={','.join(dict.fromkeys(ids))}: runs on several datasets "
                         f"({', '.join(datasets)}); the report compares uni with bi on one "
                         "test set: report each dataset's sweep on its own")
    parents = [parent for parent in (sweep.find_parent(client, i) for i in dict.fromkeys(ids))
               if parent is not None]
    settings = {training_settings(run.data.params) for run in runs if run.info.status == "FINISHED"}
    return SweepRuns(sweep_ids=list(dict.fromkeys(ids)), parents=parents, jobs=job_table(runs),
                     experiment=client.get_experiment(runs[0].info.experiment_id).name,
                     training="; ".join(sorted(settings)),
                     dataset=datasets[0] if datasets else "?")
