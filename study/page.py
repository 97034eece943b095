"""reports/findings.md as text, from the analysed sections (study/findings.py)."""

from __future__ import annotations

import math
import re

import pandas as pd

from pipeline.reports.formatting import loss, percent, points
from study import data

KEPT_MARK = "**The last page's answer**"
WAITING_MARK = "**Waiting for data.**"
CLAIM_WORDS = {"bi better": "the book's claim holds", "uni better": "the book's claim does not hold",
               "cannot tell": "cannot tell"}


def _p(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{value:.1e}" if value < 0.001 else f"{value:.3f}"


def _span(low: float, high: float) -> str:
    return f"{points(low, True)} to {points(high, True)}"


def _table(rows: list[dict]) -> str:
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)


def _rounded(schedule: str) -> str:
    """A schedule's rates to 4 significant digits: a tuned rate is a float of 17 digits."""
    return re.sub(r"\d+\.\d{5,}(e-?\d+)?", lambda m: f"{float(m.group()):.4g}", schedule)


def _schedule(cell, rows: pd.DataFrame) -> str:
    if "schedule" in rows and rows["schedule"].notna().any():
        return "; ".join(dict.fromkeys(_rounded(s) for s in rows["schedule"].dropna()))
    return f"{data.SCHEDULES[cell.schedule]} (as configured)" if cell.schedule else "–"


def cells_table(section) -> str:
    rows = []
    for cell in section.config.cells:
        found = section.cells.get(cell.label)
        if found is None:
            rows.append({"cell": cell.label, "sweep": f"`{cell.sweep}`", "parameters": "–",
                         "schedule": "–", "seeds": "waiting", "accuracy, best": "–",
                         "accuracy, last": "–", "validation loss, best": "–"})
            continue
        acc, last = found["test_acc_best"], found["test_acc_last"]
        val = found["best_val_loss"] if "best_val_loss" in found else pd.Series(dtype=float)
        rows.append({
            "cell": cell.label, "sweep": f"`{cell.sweep}`",
            "parameters": f"{int(found['param_count'].iloc[0]):,}",
            "schedule": _schedule(cell, found), "seeds": str(len(found)),
            "accuracy, best": f"{percent(acc.mean())} ± {points(acc.std())}",
            "accuracy, last": f"{percent(last.mean())} ± {points(last.std())}",
            "validation loss, best": loss(val.mean()) if val.notna().any() else "–"})
    return _table(rows)


def _answer(section, c) -> str:
    name = f"{c.config.a} − {c.config.b}"
    if c.result is None:
        return f"- *Waiting for data*: {name}."
    r = c.result
    if c.config.confirmatory:
        test = f"Welch p = {_p(r['p'])}, Holm-adjusted {_p(c.adjusted_p)}; confirmatory"
    else:
        test = f"Welch p = {_p(r['p'])}; exploratory, not adjusted"
    text = (f"- **{c.verdict}**: {name} {points(r['diff'], True)} points, 95% interval "
            f"{_span(r['low'], r['high'])} ({r['n_a']} and {r['n_b']} seeds; {test}).")
    if c.verdict == "cannot tell":
        text += (f" The design finds a true difference of {points(r['detectable'])} points "
                 "with 80% power (at an unadjusted 5% level).")
    elif r["n_pairs"] >= 2 and r["paired_low"] < 0 < r["paired_high"]:
        text += (f" Fragile: paired by seed ({r['n_pairs']} seeds) the interval is "
                 f"{_span(r['paired_low'], r['paired_high'])}, which contains 0.")
    if section.config.primary:
        text += (" This is the book's configuration, where the two nets also train with "
                 "different learning-rate schedules: section 2 separates the two.")
    if c.config.earlier:
        changed = "**changed**" if c.config.earlier != c.verdict else "unchanged"
        text += f" Last page: {c.config.earlier} ({c.config.earlier_detail}); {changed}."
    return text


def comparisons_table(section) -> str:
    rows = []
    for c in section.comparisons:
        r = c.result
        if r is None:
            continue
        rows.append({
            "a − b": f"{c.config.a} − {c.config.b}",
            "difference (points)": points(r["diff"], True),
            "95% interval": _span(r["low"], r["high"]), "Welch p": _p(r["p"]),
            "Holm p": _p(c.adjusted_p) if c.config.confirmatory else "exploratory",
            "paired by seed": (f"{points(r['paired_diff'], True)} "
                               f"({_span(r['paired_low'], r['paired_high'])}), "
                               f"{r['n_pairs']} seeds") if r["n_pairs"] else "no shared seeds",
            "Cohen's d": f"{r['cohens_d']:+.2f}",
            "P(a seed of a beats one of b)": f"{r['p_superiority']:.2f}",
            "detectable (80% power)": points(r["detectable"])})
    return _table(rows) if rows else ""


def _interaction(section) -> str:
    if section.interaction is None:
        return ""
    a, b, c, d = section.config.interaction
    r = section.interaction
    return (f"**Interaction** ({a} − {b}) − ({c} − {d}): {points(r['diff'], True)} points, "
            f"95% interval {_span(r['low'], r['high'])} (Welch-Satterthwaite, "
            f"{r['dof']:.1f} degrees of freedom), p = {_p(r['p'])}; exploratory.")


def _test_set(section) -> str:
    t = section.test_set
    if t is None:
        return ""
    return (f"**The test set's own uncertainty.** The DVC pipeline's two models (one seed "
            f"each; `{t['source']}`) score uni {percent(t['acc_uni'])}, "
            f"bi {percent(t['acc_bi'])} on the same {t['images']:,} images: uni alone is right "
            f"on {t['uni_only']}, bi alone on {t['bi_only']}; McNemar's exact test p = "
            f"{_p(t['p'])}; bi − uni {points(t['diff'], True)} points, 95% bootstrap interval "
            f"over test images {_span(t['low'], t['high'])}. This is what one pair of runs can "
            "tell before any seed-to-seed variation; exploratory.")


def _trial_values(configuration: str) -> dict[str, str]:
    """'uni model.lr=0.0117 model.lr_decay=0.74 ...' -> {'lr': '0.0117', 'decay': '0.74', ...}."""
    names = {"model.lr": "lr", "model.lr_decay": "decay", "model.lr_decay_every": "every"}
    pairs = dict(item.split("=", 1) for item in configuration.split()[1:] if "=" in item)
    return {short: f"{float(pairs[key]):.3g}" if key in pairs else "–"
            for key, short in names.items()}


def _searches(section) -> str:
    parts = []
    for search, trials in section.searches.items():
        rows = [{"trial": str(t.job), **_trial_values(t.configuration),
                 "steps at epochs": _steps(str(t.schedule)),
                 "validation loss, best": loss(t.best_val_loss),
                 "at epoch": f"{t.best_epoch:g}"} for t in trials.itertuples()]
        parts.append(f"**Search `{search}`** ({len(trials)} trials of {int(trials['epochs'].iloc[0])} "
                     "epochs, best validation loss first; the tuned cell retrains the first with "
                     f"the same fractions of a 100-epoch run):\n\n{_table(rows)}")
    return "\n\n".join(parts)


def _steps(schedule: str) -> str:
    """'0.0117; 0.0087 from epoch 10, 0.0065 from 20' -> '10, 20' (none: '–')."""
    if "; " not in schedule:
        return "–"
    return ", ".join(step.rsplit(" ", 1)[-1] for step in schedule.split("; ", 1)[1].split(", "))


def _compute(section) -> str:
    frames = list(section.cells.values()) + list(section.searches.values())
    if not frames:
        return ""
    runs = pd.concat(frames).drop_duplicates("run_id")
    files = sorted(set(runs["file"]))
    return (f"**Seeds and compute.** {len(runs)} runs, {runs['train_seconds'].sum() / 3600:.1f} "
            "hours of training in all (the sum of the runs' `train_seconds`). Data: "
            f"{', '.join(f'`{f}`' for f in files)}.")


def section_text(section) -> str:
    config = section.config
    parts = [f"**Question.** {config.question}"]
    if section.missing:
        parts.append(f"{WAITING_MARK} Not committed yet: " + ", ".join(section.missing)
                     + ". A confirmatory comparison waiting for them counts in Holm's family "
                     "as p = 1.")
    if section.cells:
        parts += ["**Answer.**\n\n" + "\n".join(_answer(section, c) for c in section.comparisons),
                  cells_table(section), comparisons_table(section), _interaction(section),
                  _test_set(section), _searches(section), config.notes,
                  f"![{config.title}]({section.figure})" if section.figure else "",
                  _compute(section)]
    parts.append("**Reproduce.**\n\n```bash\n" + "\n".join(config.commands) + "\n```")
    if section.kept:
        parts.append(f"{KEPT_MARK}, kept verbatim until the files above are committed:\n\n"
                     + section.kept)
    return "\n\n".join(part for part in parts if part)


def _claim(sections, book: dict) -> str:
    printed = book["param_count"]
    ours = next((s.cells for s in sections if s.config.primary), {})
    counts = {c.kind: int(rows["param_count"].iloc[0]) for s in sections if s.config.primary
              for c in s.config.cells for rows in [ours.get(c.label)] if rows is not None}
    text = (f"**The book's claim.** Table 19-12 (section 19.7.4) gives the unidirectional net "
            f"{percent(book['test']['uni']['best']['accuracy'])} test accuracy with "
            f"{printed['uni']:,} parameters and the bidirectional one "
            f"{percent(book['test']['bi']['best']['accuracy'])} with {printed['bi']:,}, one "
            "unseeded run each, and concludes that the bidirectional net is better.")
    if counts:
        text += (f" Counted from the same architectures, the nets have {counts['uni']:,} and "
                 f"{counts['bi']:,} parameters.")
    return text


def _changes(sections) -> str:
    changed = [f"- {s.config.title}, {c.config.a} − {c.config.b}: {c.config.earlier} → "
               f"{c.verdict}." for s in sections for c in s.comparisons
               if c.verdict and c.config.earlier and c.config.earlier != c.verdict]
    return "**Changed since the last page.**" + ("\n\n" + "\n".join(changed) if changed
                                                 else " None.")


def render(sections, book: dict, confidence: float) -> str:
    family = sum(c.config.confirmatory for s in sections for c in s.comparisons)
    body = "\n\n".join(f"## {s.number}. {s.config.title}\n\n{section_text(s)}" for s in sections)
    level = f"{100 * confidence:g}%"
    return f"""# Findings: unidirectional vs bidirectional RNN

Generated by `python -m study.findings` (`make findings`) from the committed per-run tables
`reports/sweeps/*/runs.csv` and the DVC pipeline's committed test predictions, as configured
in `study/conf/findings.yaml`; do not edit by hand. Unless a section says otherwise: the
book's configuration (100 epochs, batch 128, float64, MNIST read as 28 rows of 28 pixels) and
its metric, test accuracy with the parameters of the best validation loss.

{_claim(sections, book)}

**How to read the verdicts.** The primary question is the book's claim at its configuration
(section 1). The {family} comparisons marked confirmatory are tested together: Welch's
two-sided t test over seeds, p-values adjusted by Holm's method over all {family} (one whose
data is not committed yet counts as p = 1); a verdict is "bi better" or "uni better" when the
adjusted p is below {_p(1 - confidence)}, else "cannot tell" (for the claim: "the book's claim
holds", "does not hold" or "cannot tell"). Every other comparison is exploratory: its verdict
comes from its unadjusted {level} Welch interval. Intervals are {level}, unadjusted; "paired
by seed" uses the seeds both cells ran (a seed gives both models the same batch order);
"detectable" is the smallest true difference the test finds with 80% power at the observed
spreads and an unadjusted 5% level (a confirmatory test, Holm-adjusted, needs more).

{_changes(sections)}

{body}
"""
