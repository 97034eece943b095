"""The compare stage's sweep mode: the multi-seed report of one sweep, from MLflow alone.

    python -m pipeline.compare sweep=<id> [confidence=0.95]

writes reports/sweeps/<id>/ (report.md, runs.csv, summary.csv, differences.csv,
per_seed.png) and logs the same files and the report's numbers to the sweep's parent run.
The folder is written under a temporary name and swapped in whole, after the tracking calls:
a failure leaves the previous report, or none, never half of one.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from pipeline import figures, io, report, sweep_report, sweep_runs, tracking
from pipeline.cli import StageError
from pipeline.paths import project_path

log = logging.getLogger(__name__)


def check_both_models(found: sweep_runs.SweepRuns) -> None:
    jobs = found.jobs
    kinds = set(sweep_report.finished(jobs)["kind"])
    if {"uni", "bi"} <= kinds:
        return
    counts = ", ".join(f"{n} {s.lower()}" for s, n in jobs["status"].value_counts().items())
    have = " and ".join(sorted(kinds)) + " only" if kinds else "none"
    raise StageError(f"sweep={found.sweep_id}: finished runs of {have} ({len(jobs)} jobs: "
                     f"{counts}); the report compares uni with bi, so the sweep needs "
                     "finished runs of both (e.g. model=uni,bi)")


def wall_seconds(parent) -> float | None:
    if parent is None or not parent.info.end_time:
        return None
    return (parent.info.end_time - parent.info.start_time) / 1000


def context(found: sweep_runs.SweepRuns, confidence: float) -> dict:
    parent = found.parent
    tags = parent.data.tags if parent is not None else {}
    return {"sweep_id": found.sweep_id, "experiment": found.experiment,
            "parent": parent.info.run_id if parent is not None else "none",
            "sweep_overrides": tags.get("sweep_overrides", "?"),
            "preset": tags.get("preset", "?"), "launcher": tags.get("launcher", "?"),
            "dataset": found.dataset,
            "training": found.training, "confidence": confidence,
            "wall_seconds": wall_seconds(parent)}


def write_files(folder: Path, page: str, jobs, summary, diffs, figure) -> None:
    (folder / "report.md").write_text(page, encoding="utf-8")
    jobs.to_csv(folder / "runs.csv", index=False)
    summary.to_csv(folder / "summary.csv", index=False)
    diffs.to_csv(folder / "differences.csv", index=False)
    figures.save_png(figure, folder / "per_seed.png")


def main(cfg: DictConfig, client) -> None:
    started = time.monotonic()
    found = sweep_runs.fetch(client, cfg.sweep)
    check_both_models(found)
    book = report.load_book(project_path(cfg.paths.book_numbers))
    jobs = found.jobs
    summary = sweep_report.summarize(jobs)
    diffs = sweep_report.differences(jobs, cfg.confidence)
    page = sweep_report.page(context(found, cfg.confidence), summary, diffs, jobs, book)
    kinds = [kind for kind in ("uni", "bi") if kind in set(summary["kind"])]
    figure = figures.per_seed(sweep_report.finished(jobs), list(summary["configuration"]),
                              {kind: book["test"][kind] for kind in kinds})

    target = project_path(cfg.paths.reports_dir) / "sweeps" / found.sweep_id
    with io.staging_dir(target) as staging:
        write_files(staging, page, jobs, summary, diffs, figure)
        if found.parent is None:
            log.warning("sweep %s has no parent run: the report is written to files only",
                        found.sweep_id)
        else:  # tracking first, files last (the staging folder is swapped in on success)
            parent_id = found.parent.info.run_id
            client.log_artifacts(parent_id, str(staging), "report")
            tracking.log_metrics(client, parent_id,
                                 sweep_report.parent_metrics(summary, diffs))
    log.info("wrote %s/report.md in %.1f s", target, time.monotonic() - started)
    for _, pair in diffs.iterrows():
        print(sweep_report.verdict(pair))
    print(f"report: {target / 'report.md'}")
