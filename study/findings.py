"""The findings page: each question the project's sweeps answer, in one sentence, its answer in
one sentence, a figure, a table and the commands that regenerate it, from MLflow alone.

    python -m study.findings        -> reports/findings.md, reports/findings/
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from pipeline import files
from pipeline.entrypoint import stage
from pipeline.errors import StageError
from pipeline.paths import project_path
from pipeline.reports import figures, formatting, table_19_12
from pipeline.sweeps import page, statistics
from pipeline.sweeps import runs as sweep_runs
from pipeline.sweeps import job as sweep_job
from pipeline.tracking import runs as tracked_runs
from pipeline.tracking import store
from study import capacity, schema, tuning

log = logging.getLogger(__name__)

FOLDER = "findings"  # figures and CSVs beside reports/findings.md


def _commands(finding: DictConfig) -> str:
    return "```bash\n" + "\n".join(finding.commands) + "\n```"


def _not_run(client, finding: DictConfig, what: str) -> str:
    """'' when every sweep of ``finding`` has ended in the store; else a line saying what the
    section waits for, with the commands that run it."""
    commands = f"\n\n{_commands(finding)}" if finding.commands else ""
    if not finding.sweeps:
        return f"*Not run yet*: {what}.{commands}"
    waiting = []
    for sweep_id in finding.sweeps:
        job_runs = tracked_runs.search_runs(client, sweep_job.jobs_filter(sweep_id))
        running = sum(run.info.status == "RUNNING" for run in job_runs)
        if not job_runs:
            waiting.append(f"`{sweep_id}` (no runs in the tracking store)")
        elif running:
            waiting.append(f"`{sweep_id}` ({running} of {len(job_runs)} jobs still running)")
    if waiting:
        return f"*Not run yet*: {what}; waiting for {', '.join(waiting)}.{commands}"
    return ""


def _fetch(client, finding: DictConfig):
    try:
        return sweep_runs.fetch(client, list(finding.sweeps))
    except StageError as exc:
        raise StageError(f"findings: {exc}") from None


def _summary_rows(summary: pd.DataFrame, diffs: pd.DataFrame) -> str:
    rows = []
    for row in summary.itertuples():
        rows.append({"configuration": f"`{row.configuration}`", "parameters": row.param_count,
                     "seeds": row.seeds,
                     "accuracy, best": f"{formatting.percent(row.test_acc_best_mean)} ± "
                                       f"{formatting.points(row.test_acc_best_std)}",
                     "accuracy, last": f"{formatting.percent(row.test_acc_last_mean)} ± "
                                       f"{formatting.points(row.test_acc_last_std)}",
                     "loss, best": formatting.loss(row.test_loss_best_mean)})
    table = pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)
    if diffs.empty:
        return table
    pairs = pd.DataFrame([{
        "bi − uni": f"`{p.bi}` − `{p.uni}`",
        "accuracy, best (points)": f"{formatting.points(p.test_acc_best_diff, True)} "
                                   f"({formatting.points(p.test_acc_best_low, True)} to "
                                   f"{formatting.points(p.test_acc_best_high, True)})",
        "accuracy, last (points)": f"{formatting.points(p.test_acc_last_diff, True)} "
                                   f"({formatting.points(p.test_acc_last_low, True)} to "
                                   f"{formatting.points(p.test_acc_last_high, True)})"}
        for p in diffs.itertuples()])
    return table + "\n\n" + pairs.to_markdown(index=False, disable_numparse=True)


def _over_seeds(client, cfg: DictConfig, finding: DictConfig):
    """The finding's runs summarised over seeds: (found, summary, bi - uni differences)."""
    found = _fetch(client, finding)
    return (found, statistics.summarize(found.jobs),
            statistics.differences(found.jobs, cfg.confidence))


def _per_seed_figure(found, summary, book_points: dict, path: Path) -> None:
    figures.save_png(figures.per_seed(statistics.finished(found.jobs),
                                      list(summary["configuration"]), book_points), path)


def _verdicts(diffs: pd.DataFrame) -> str:
    return " ".join(page.verdict(pair) for _, pair in diffs.iterrows())


def claim_section(client, cfg: DictConfig, book: dict, out: Path) -> str:
    finding = cfg.claim
    found, summary, diffs = _over_seeds(client, cfg, finding)
    _per_seed_figure(found, summary, {k: book["test"][k] for k in ("uni", "bi")},
                     out / "claim_per_seed.png")
    answer = _verdicts(diffs)
    return f"""**Question.** Is the bidirectional net (2170 parameters) better than the
unidirectional one (2282), as the book's table 19-12 says from one unseeded run of each?

**Answer.** {answer}

{_summary_rows(summary, diffs)}

Means ± sample standard deviations over seeds; intervals: Welch's t at {100 * cfg.confidence:g}%.
Full report: [`reports/sweeps/{found.report_id}/`](sweeps/{found.report_id}/report.md).

![Per-seed test results]({FOLDER}/claim_per_seed.png)

{_commands(finding)}"""


def capacity_section(client, cfg: DictConfig, book: dict, out: Path) -> str:
    finding = cfg.capacity
    found = _fetch(client, finding)
    sizes = capacity.sizes(found.jobs)
    diffs = capacity.equal_size_differences(found.jobs, confidence=cfg.confidence)
    book_points = {"book uni": (book["param_count"]["uni"], book["test"]["uni"]["best"]["accuracy"]),
                   "book bi": (book["param_count"]["bi"], book["test"]["bi"]["best"]["accuracy"])}
    figures.save_png(figures.accuracy_by_size(sizes, book_points), out / "accuracy_by_size.png")
    sizes.to_csv(out / "accuracy_by_size.csv", index=False)
    table = pd.DataFrame({
        "family": sizes["family"], "hidden (per chain)": sizes["hidden"],
        "parameters": sizes["param_count"], "seeds": sizes["seeds"],
        "accuracy mean": [formatting.percent(v) for v in sizes["mean"]],
        "sd (points)": [formatting.points(v) for v in sizes["std"]],
        "min": [formatting.percent(v) for v in sizes["min"]],
        "max": [formatting.percent(v) for v in sizes["max"]]})
    return f"""**Question.** At an equal number of parameters, is reading the sequence both ways
better than reading it once with a larger hidden state?

**Answer.** {capacity.answer(diffs)}

{table.to_markdown(index=False, disable_numparse=True)}

Test accuracy with the best parameters; every size with the book's schedules (uni: lr 0.005
constant; bi: 0.01 with steps at epochs 30, 50, 70). Uni's accuracy at bi's parameter count
is interpolated linearly in log parameters between uni's sizes; the intervals resample the
seeds of every size 4,000 times (percentile bootstrap).

![Accuracy against parameter count]({FOLDER}/accuracy_by_size.png)

{_commands(finding)}"""


def fashion_section(client, cfg: DictConfig, out: Path) -> str:
    finding = cfg.fashion
    found, summary, diffs = _over_seeds(client, cfg, finding)
    _per_seed_figure(found, summary, {}, out / "fashion_per_seed.png")
    answer = _verdicts(diffs)
    return f"""**Question.** Does the bidirectional net's advantage carry over to another dataset of
28x28 images read row by row, Fashion-MNIST (dataset `{found.dataset}`), with the book's
architectures and schedules unchanged?

**Answer.** {answer}

{_summary_rows(summary, diffs)}

Means ± sample standard deviations over seeds; intervals: Welch's t at {100 * cfg.confidence:g}%.
The book has no Fashion-MNIST numbers. The DVC pipeline makes the same table 19-12 for
Fashion-MNIST from one seed (`dvc repro compare@fashion_mnist`:
[`reports/table_19_12/fashion_mnist/`](table_19_12/fashion_mnist/report.md)); these runs are
the five-seed sweep of the commands below.

![Per-seed test results on Fashion-MNIST]({FOLDER}/fashion_per_seed.png)

{_commands(finding)}"""


def merges_section(client, cfg: DictConfig, out: Path) -> str:
    finding = cfg.merges
    found, summary, diffs = _over_seeds(client, cfg, finding)
    bi = summary[summary["kind"] == "bi"].sort_values("test_acc_best_mean", ascending=False)
    ranking = ", ".join(f"`{row.configuration}` {formatting.percent(row.test_acc_best_mean)} "
                        f"({row.param_count} parameters, {row.seeds} seeds)"
                        for row in bi.itertuples())
    above = [p.bi for p in diffs.itertuples() if p.test_acc_best_low > 0]
    verdict = (f"against uni, the interval of bi − uni lies above zero for "
               f"{', '.join(f'`{b}`' for b in above)}" if above else
               "against uni, no merge's interval of bi − uni lies above zero")
    return f"""**Question.** Which of formula 5's four ways of merging the two chains' final
states works best, and does any beat uni?

**Answer.** Mean test accuracy (best parameters), best first: {ranking}; {verdict}
({100 * cfg.confidence:g}% Welch intervals below). `bi` is the sum, the book's merge.

{_summary_rows(summary, diffs)}

Full report: [`reports/sweeps/{found.report_id}/`](sweeps/{found.report_id}/report.md).

{_commands(finding)}"""


def findings_task(cfg: DictConfig) -> None:
    client = store.connect(cfg.tracking)
    book = table_19_12.load_book(project_path(cfg.paths.book_numbers))
    reports = project_path(cfg.paths.reports_dir)
    with files.publish_dir(reports / FOLDER, "report") as out:
        # Each section once its sweeps have ended; until then, what it waits for.
        sections = {
            "1. The book's claim, over 20 seeds": _not_run(
                client, cfg.claim, "the book configuration over 20 seeds per model")
            or claim_section(client, cfg, book, out),
            "2. Accuracy against parameter count": _not_run(
                client, cfg.capacity, "uni with 8-64 hidden units and bi with 4-32 per chain")
            or capacity_section(client, cfg, book, out),
            "3. The four merges": _not_run(client, cfg.merges, "bi with sum, concat, mean and mul")
            or merges_section(client, cfg, out),
            "4. Fashion-MNIST": _not_run(client, cfg.fashion,
                                         "both models over 5 seeds on Fashion-MNIST")
            or fashion_section(client, cfg, out),
            "5. A tuned bidirectional net": _not_run(client, cfg.tuned, "an Optuna search of "
                                                     "bi's learning rate and schedule")
            or tuning.tuned_section(client, cfg, out, FOLDER),
        }
    body = "\n\n".join(f"## {title}\n\n{text}" for title, text in sections.items())
    files.write_text(reports / "findings.md", f"""# Findings: unidirectional vs bidirectional RNN

Generated by `python -m study.findings` from the MLflow runs of the sweeps named in
`study/conf/findings.yaml`; do not edit by hand. Book configuration unless a section says otherwise:
100 epochs, batch 128, float64, MNIST read as 28 rows of 28 pixels.

{body}
""")
    log.info("wrote %s", reports / "findings.md")


CONF_DIR = Path(__file__).resolve().parent / "conf"
assert schema.FindingsConfig  # registered in Hydra's ConfigStore on import
main = stage("findings", config_dir=CONF_DIR)(findings_task)

if __name__ == "__main__":
    main()
