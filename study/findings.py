"""The findings page from committed data alone:

    python -m study.findings        -> reports/findings.md, reports/findings/<section>_*.png

Each section's cells are read from reports/sweeps/*/runs.csv; its comparisons are computed,
the confirmatory ones Holm-adjusted together; a section whose files are missing keeps the
last page's text. Nothing is deleted."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from pipeline import files
from pipeline.guard.entrypoint import stage
from pipeline.paths import project_path
from pipeline.reports import figures as report_figures
from pipeline.reports import table_19_12
from study import data, figures, page, schema, statistics

log = logging.getLogger(__name__)

FOLDER = "findings"  # figures beside reports/findings.md


@dataclass
class Comparison:
    config: DictConfig
    a_word: str  # how the verdict names cell a: "bi", or the cell's label
    b_word: str
    result: dict | None = None  # statistics.compare; None while a cell's runs are missing
    adjusted_p: float | None = None  # Holm, for a confirmatory comparison
    verdict: str | None = None


@dataclass
class Section:
    number: int
    config: DictConfig
    cells: dict[str, pd.DataFrame]  # label -> finished runs; absent: not committed
    missing: list[str]  # runs files not committed yet
    comparisons: list[Comparison]
    interaction: dict | None = None
    test_set: dict | None = None  # McNemar on the DVC pipeline's predictions
    searches: dict[str, pd.DataFrame] = field(default_factory=dict)
    kept: str | None = None  # the last page's text, while files are missing
    figure: str | None = None  # file name under reports/findings/


def _words(section: DictConfig, a: DictConfig, b: DictConfig) -> tuple[str, str]:
    if {a.kind, b.kind} == {"uni", "bi"}:
        return a.kind, b.kind
    return a.label, b.label


def analyse(number: int, section: DictConfig, runs: pd.DataFrame, confidence: float,
            metrics_dir: Path, dataset: str = "mnist") -> Section:
    """The section's cells and comparisons from ``runs`` (verdicts wait for Holm)."""
    declared = {cell.label: cell for cell in section.cells}
    cells, short = {}, []
    sweeps = [cell.sweep for cell in section.cells] + list(section.searches)
    absent = data.missing(runs, sweeps)
    for cell in section.cells:
        rows = data.cell_rows(runs, cell)
        if len(rows) >= 2:
            cells[cell.label] = rows
        elif f"`{data.runs_file(cell.sweep)}`" not in absent:
            short.append(f"`{data.runs_file(cell.sweep)}` ({len(rows)} finished runs of cell "
                         f"'{cell.label}'; a comparison needs 2)")
    result = Section(number, section, cells, absent + short, [])
    for comparison in section.comparisons:
        a, b = declared[comparison.a], declared[comparison.b]
        item = Comparison(comparison, *_words(section, a, b))
        if a.label in cells and b.label in cells:
            rows_a, rows_b = cells[a.label], cells[b.label]
            item.result = statistics.compare(rows_a[data.METRIC], rows_b[data.METRIC],
                                             confidence, rows_a["seed"], rows_b["seed"])
        result.comparisons.append(item)
    if section.interaction and all(label in cells for label in section.interaction):
        groups = [cells[label][data.METRIC].to_numpy() for label in section.interaction]
        result.interaction = statistics.contrast(groups, [1, -1, -1, 1], confidence)
    if section.test_set_uncertainty:
        uni, bi = (data.correct_predictions(metrics_dir, kind) for kind in ("uni", "bi"))
        result.test_set = {**statistics.mcnemar(uni, bi, confidence),
                           "source": f"metrics/{dataset}/predictions_*_best.csv"}
    for search in section.searches:
        trials = runs[runs["sweep"] == search]
        if not trials.empty:
            result.searches[search] = trials.sort_values(["best_val_loss", "job"])
    return result


def decide(sections: list[Section], confidence: float) -> None:
    """Holm over every confirmatory comparison of the page (missing ones as p = 1), then each
    comparison's verdict: confirmatory by its adjusted p, exploratory by its interval."""
    family = [c for s in sections for c in s.comparisons if c.config.confirmatory]
    adjusted = statistics.holm([c.result["p"] if c.result else None for c in family])
    for comparison, p in zip(family, adjusted):
        comparison.adjusted_p = p
    alpha = 1 - confidence
    for section in sections:
        for c in section.comparisons:
            if c.result is None:
                continue
            p = c.adjusted_p if c.config.confirmatory else c.result["p"]
            c.verdict = statistics.verdict(c.result["diff"], p < alpha, c.a_word, c.b_word)
            if section.config.primary:
                c.verdict = page.CLAIM_WORDS.get(c.verdict, c.verdict)


def committed_sections(text: str) -> dict[str, str]:
    """The committed page's answers, section title (without its number) -> text: for a
    section that already keeps an older text, that older text; none for a section that
    waited for data and had no answer yet."""
    sections = {}
    for match in re.finditer(r"^## (?:\d+\. )?(.+?)\n(.*?)(?=^## |\Z)", text, re.M | re.S):
        body = match.group(2).strip("\n")
        kept = body.find(page.KEPT_MARK)
        if kept >= 0:
            sections[match.group(1).strip()] = body[kept:].split("\n", 2)[2].strip("\n")
        elif page.WAITING_MARK not in body:
            sections[match.group(1).strip()] = body
    return sections


def draw(section: Section, book: dict, out: Path, confidence: float) -> None:
    """The section's figure, written atomically; none while it has no cells."""
    kind = section.config.figure
    if kind == "none" or not section.cells:
        return
    dataset = next(iter(section.cells.values()))["dataset"].iloc[0]
    on_mnist = dataset == "mnist"
    if kind == "by_size":
        stars = {f"book {k}": (book["param_count"][k], book["test"][k]["best"]["accuracy"])
                 for k in ("uni", "bi")} if on_mnist else {}
        fig = figures.accuracy_by_size(section.cells, stars, dataset, confidence)
        name = f"{section.config.name}_accuracy_by_size.png"
    else:
        stars = {k: book["test"][k] for k in ("uni", "bi")} if on_mnist else {}
        fig = figures.per_seed(section.cells, stars, dataset)
        name = f"{section.config.name}_per_seed.png"
    with files.atomic_path(out / name, suffix=".png") as tmp:
        report_figures.save_png(fig, tmp)
    section.figure = f"{FOLDER}/{name}"


def findings_task(cfg: DictConfig) -> None:
    reports = project_path(cfg.paths.reports_dir)
    book = table_19_12.load_book(project_path(cfg.paths.book_numbers))
    runs = data.load_runs(reports)
    page_path = reports / "findings.md"
    earlier = committed_sections(page_path.read_text(encoding="utf-8")) \
        if page_path.exists() else {}
    sections = [analyse(n, section, runs, cfg.confidence, project_path(cfg.paths.metrics_dir),
                        cfg.dataset) for n, section in enumerate(cfg.sections, start=1)]
    decide(sections, cfg.confidence)
    for section in sections:
        if section.missing:
            titles = [section.config.title, *section.config.earlier_titles]
            section.kept = next((earlier[t] for t in titles if t in earlier), None)
        draw(section, book, reports / FOLDER, cfg.confidence)
    files.write_text(page_path, page.render(sections, book, cfg.confidence))
    log.info("wrote %s (%d sections, %d waiting for data)", page_path, len(sections),
             sum(bool(s.missing) for s in sections))


CONF_DIR = Path(__file__).resolve().parent / "conf"
assert schema.FindingsConfig  # registered in Hydra's ConfigStore on import
main = stage("findings", config_dir=CONF_DIR)(findings_task)

if __name__ == "__main__":
    main()
