"""The multi-seed report of one or more sweeps, from MLflow alone (the task of
``python -m pipeline.commands.sweep_report``): writes reports/sweeps/<id>/ (report.md, runs.csv, summary.csv, differences.csv, per_seed.png,
predictions.npz (the runs' per-image test predictions: pipeline.sweeps.predictions);
several: reports/sweeps/<id>+<id>/) whole, and logs the same to the sweep's parent run (several
sweeps: to a report run of their own).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, ListConfig

from pipeline import files
from pipeline.guard.errors import StageError
from pipeline.paths import project_path
from pipeline.reports import figures, table_19_12
from pipeline.sweeps import job as sweep
from pipeline.sweeps import page, predictions, statistics
from pipeline.sweeps import runs as sweep_runs
from pipeline.tracking import metrics, runs, store

log = logging.getLogger(__name__)


def requested_ids(value) -> list[str]:
    """``sweep=<id>`` or ``sweep=[<id>,...]`` as a list of ids."""
    values = list(value) if isinstance(value, (list, ListConfig)) else [value]
    if not values or any(isinstance(v, (list, dict, ListConfig)) or v is None for v in values):
        raise StageError(f"sweep: must be a sweep id or a list of them, got {value!r}")
    return [sweep.check_id(v) for v in values]


def check_finished(found: sweep_runs.SweepRuns) -> None:
    """At least one finished run: a sweep of one model still gets its runs table (runs.csv)."""
    jobs = found.jobs
    if len(statistics.finished(jobs)):
        return
    counts = ", ".join(f"{n} {s.lower()}" for s, n in jobs["status"].value_counts().items())
    raise StageError(f"sweep={found.report_id}: no finished run ({len(jobs)} jobs: {counts}); "
                     "the report summarises finished runs")


def check_same_runs(target: Path, jobs) -> None:
    """A report folder that exists is replaced only by a report of the same runs (more of
    them, once more jobs ended, is fine), never by another sweep's data under a reused id
    (a new store, a committed report)."""
    earlier_table = target / "runs.csv"
    if not earlier_table.exists():
        return
    try:
        earlier = set(pd.read_csv(earlier_table)["run_id"].dropna())
    except (OSError, ValueError, KeyError) as exc:
        raise StageError(f"{earlier_table}: unreadable ({' '.join(str(exc).split())}): the "
                         "report there cannot be matched with these runs; move that folder "
                         "away to write a new one") from None
    others = earlier - set(jobs["run_id"])
    if others:
        raise StageError(f"{target}: holds the report of {len(others)} runs that are not in "
                         "these sweeps (the same id used again, or another tracking store): "
                         "give the sweep a new id, or move that folder away first")


def wall_seconds(parent) -> float | None:
    if parent is None or not parent.info.end_time:
        return None
    return (parent.info.end_time - parent.info.start_time) / 1000


def experiment_overrides(overrides: str) -> str:
    """The sweep's command-line overrides less where it tracked (``tracking.*``: a store's
    path or address is no part of the experiment, and would put a local path in the report)."""
    return " ".join(o for o in overrides.split() if not o.lstrip("+~").startswith("tracking."))


def describe_sweeps(found: sweep_runs.SweepRuns) -> list[dict]:
    parents = {p.data.tags.get(sweep.SWEEP_TAG): p for p in found.parents}
    described = []
    for sweep_id in found.sweep_ids:
        parent = parents.get(sweep_id)
        tags = parent.data.tags if parent is not None else {}
        described.append({"id": sweep_id,
                          "parent": parent.info.run_id if parent is not None else None,
                          "overrides": experiment_overrides(tags.get("sweep_overrides", "?")),
                          "preset": tags.get("preset", "?"), "launcher": tags.get("launcher", "?"),
                          "wall_seconds": wall_seconds(parent)})
    return described


def command(sweep_ids: list[str]) -> str:
    return sweep.report_command(sweep_ids)


def write_files(folder: Path, text: str, jobs, summary, diffs, figure,
                predicted=None) -> None:
    (folder / "report.md").write_text(text, encoding="utf-8")
    predictions.write_report_file(folder, predicted)
    jobs.to_csv(folder / "runs.csv", index=False)
    summary.to_csv(folder / "summary.csv", index=False)
    diffs.to_csv(folder / "differences.csv", index=False)
    figures.save_png(figure, folder / "per_seed.png")


def artifact_link(run_id: str, path: str) -> str:
    """A run artifact's URL relative to the UI, as its own artifact viewer loads them: a
    figure in a run's description renders with it."""
    return f"get-artifact?path={path}&run_uuid={run_id}"


def log_report(client, folder: Path, values: dict, run_id: str) -> None:
    client.log_artifacts(run_id, str(folder), "report")
    metrics.log_metrics(client, run_id, values)


def sweep_report_task(cfg: DictConfig) -> None:
    started = time.monotonic()
    client = store.connect(cfg.tracking)
    found = sweep_runs.fetch(client, requested_ids(cfg.sweep))
    check_finished(found)
    book = table_19_12.load_book(project_path(cfg.paths.book_numbers))
    jobs = found.jobs
    summary = statistics.summarize(jobs)
    diffs = statistics.differences(jobs, cfg.confidence)
    values = page.parent_metrics(summary, diffs)
    kinds = [kind for kind in ("uni", "bi") if kind in set(summary["kind"])]
    figure = figures.per_seed(statistics.finished(jobs), list(summary["configuration"]),
                              {kind: book["test"][kind] for kind in kinds})
    context = {"report_id": found.report_id, "command": command(found.sweep_ids),
               "experiment": found.experiment, "dataset": found.dataset,
               "training": found.training, "confidence": cfg.confidence,
               "sweeps": describe_sweeps(found), "report_run": None}

    target = project_path(cfg.paths.reports_dir) / "sweeps" / found.report_id
    check_same_runs(target, jobs)
    predicted = predictions.gather(client, jobs)
    with files.publish_dir(target, "report") as staging:
        if len(found.sweep_ids) == 1 and found.parents:  # the sweep's own parent holds it
            parent = found.parents[0]
            run_id = parent.info.run_id
            write_files(staging, page.page(context, summary, diffs, jobs, book), jobs,
                        summary, diffs, figure, predicted)
            figure_url = artifact_link(run_id, "report/per_seed.png")
            log_report(client, staging, values, run_id)
            runs.set_description(client, run_id, page.parent_description(
                found.report_id, "python -m pipeline.stages.train -m " + experiment_overrides(
                    parent.data.tags.get("sweep_overrides", "?")), len(jobs), diffs, summary,
                figure_url))
        else:  # several sweeps (or no parent): a report run of its own
            tags = {"stage": "sweep report", "compared_sweeps": ",".join(found.sweep_ids)}
            with runs.new_run(client, found.experiment, f"sweeps {found.report_id}",
                              tags) as run_id:
                context["report_run"] = run_id
                write_files(staging, page.page(context, summary, diffs, jobs, book),
                            jobs, summary, diffs, figure, predicted)
                log_report(client, staging, values, run_id)
    log.info("wrote %s/report.md in %.1f s", target, time.monotonic() - started)
    for _, pair in diffs.iterrows():
        print(page.verdict(pair))
    print(f"report: {target / 'report.md'}")
