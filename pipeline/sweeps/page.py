"""The multi-seed report's page: the verdict on the book's claim in sentences, and the Markdown
tables of the summaries, differences and runs. Pure functions of pipeline.sweeps.statistics'
tables and the book's numbers.

The claim (chapter 19.7): bi is better with fewer parameters. "Better" is tested as a higher
mean test accuracy with the best parameters: Welch's interval of bi - uni above zero.
"""

from __future__ import annotations

import math

import pandas as pd

from pipeline.metric_names import test_metric
from pipeline.reports import formatting
from pipeline.sweeps.statistics import KIND_ORDER

def _points(fraction: float) -> str:
    return formatting.points(fraction, signed=True)


def _sign_of(low: float, high: float) -> str:
    return "above zero" if low > 0 else "below zero" if high < 0 else "containing zero"


def verdict(pair: pd.Series) -> str:
    """Plain sentences on the book's claim for one bi/uni pair: the verdict on the best
    parameters' accuracy (the table's number), then how the last parameters compare."""
    level = f"{100 * pair['confidence']:g}%"
    diff, low, high = (pair[f"test_acc_best_{k}"] for k in ("diff", "low", "high"))
    evidence = (f"`{pair['bi']}` minus `{pair['uni']}`: mean test accuracy (best parameters) "
                f"{_points(diff)} points, {level} interval {_points(low)} to {_points(high)} "
                f"({pair['bi_seeds']} and {pair['uni_seeds']} seeds, Welch's t with "
                f"{pair['test_acc_best_dof']:.1f} degrees of freedom)")
    fewer = pair["bi_param_count"] < pair["uni_param_count"]
    params = (f"with {pair['bi_param_count']} parameters against {pair['uni_param_count']}")
    if low > 0 and fewer:
        claim = f"the book's claim holds at {level} confidence: bi is better {params}."
    elif low > 0:
        claim = (f"bi is better at {level} confidence, but {params} it is not smaller, so "
                 "\"better with fewer parameters\" does not hold as stated.")
    elif high < 0:
        claim = (f"the book's claim does not hold: at {level} confidence uni is better "
                 f"(bi {params}).")
    else:
        claim = (f"the interval contains zero, so at {level} confidence these seeds neither "
                 f"confirm nor refute the book's claim (bi {params}).")
        needed = pair.get("test_acc_best_seeds_needed")
        if needed is not None and not pd.isna(needed):
            claim += (f" With the observed spreads, a true difference of this size would need "
                      f"{int(needed)} seeds per model to show at {level} confidence with 80% "
                      "power (Welch's test, noncentral t).")
    last_low, last_high = pair["test_acc_last_low"], pair["test_acc_last_high"]
    last = (f" With the last parameters the difference is {_points(pair['test_acc_last_diff'])} "
            f"points ({_points(last_low)} to {_points(last_high)}, "
            f"{_sign_of(last_low, last_high)}).")
    return f"{evidence}: {claim}{last}"


# ----------------------------------------------------------------------------- Markdown
_pct, _pt, _loss = formatting.percent, formatting.points, formatting.loss


def summary_markdown(summary: pd.DataFrame, book: dict) -> str:
    rows = []
    for _, row in summary.iterrows():
        for rule in ("best", "last"):
            acc, loss = f"test_acc_{rule}", f"test_loss_{rule}"
            rows.append({
                "configuration": f"`{row['configuration']}`", "parameters": row["param_count"],
                "seeds": row["seeds"], "rule": rule,
                "accuracy mean": _pct(row[f"{acc}_mean"]), "sd (points)": _pt(row[f"{acc}_std"]),
                "min": _pct(row[f"{acc}_min"]), "max": _pct(row[f"{acc}_max"]),
                "loss mean": _loss(row[f"{loss}_mean"]), "loss sd": _loss(row[f"{loss}_std"]),
                "loss min": _loss(row[f"{loss}_min"]), "loss max": _loss(row[f"{loss}_max"])})
    for kind in sorted(set(summary["kind"]), key=lambda k: KIND_ORDER.get(k, 2)):
        for rule in ("best", "last"):
            result = book["test"].get(kind, {}).get(rule)
            if result is None:
                continue
            rows.append({"configuration": f"book, {kind} (one unseeded run)",
                         "parameters": book["param_count"].get(kind, "–"), "seeds": 1,
                         "rule": rule, "accuracy mean": _pct(result["accuracy"]),
                         "sd (points)": "–", "min": "–", "max": "–",
                         "loss mean": _loss(result["loss"]), "loss sd": "–", "loss min": "–",
                         "loss max": "–"})
    table = pd.DataFrame(rows)
    return table.to_markdown(index=False, disable_numparse=True,
                             colalign=["left"] + ["right"] * (table.shape[1] - 1))


def differences_markdown(diffs: pd.DataFrame) -> str:
    rows = []
    for _, pair in diffs.iterrows():
        level = f"{100 * pair['confidence']:g}%"
        for rule in ("best", "last"):
            acc, loss = f"test_acc_{rule}", f"test_loss_{rule}"
            rows.append({
                "bi − uni": f"`{pair['bi']}` − `{pair['uni']}`", "rule": rule,
                "accuracy (points)": _points(pair[f"{acc}_diff"]),
                f"{level} interval": f"{_points(pair[f'{acc}_low'])} to {_points(pair[f'{acc}_high'])}",
                "dof": f"{pair[f'{acc}_dof']:.1f}",
                "loss": f"{pair[f'{loss}_diff']:+.4f}",
                f"loss {level} interval": f"{pair[f'{loss}_low']:+.4f} to {pair[f'{loss}_high']:+.4f}",
            })
    table = pd.DataFrame(rows)
    return table.to_markdown(index=False, disable_numparse=True,
                             colalign=["left"] + ["right"] * (table.shape[1] - 1))


def runs_markdown(jobs: pd.DataFrame) -> str:
    several = jobs["sweep"].nunique() > 1
    table = pd.DataFrame({
        **({"sweep": [f"`{x}`" for x in jobs["sweep"]]} if several else {}),
        "job": jobs["job"], "configuration": [f"`{c}`" for c in jobs["configuration"]],
        "seed": jobs["seed"], "status": jobs["status"],
        "accuracy best": [_pct(v) for v in jobs["test_acc_best"]],
        "loss best": [_loss(v) for v in jobs["test_loss_best"]],
        "accuracy last": [_pct(v) for v in jobs["test_acc_last"]],
        "loss last": [_loss(v) for v in jobs["test_loss_last"]],
        "train s": ["–" if pd.isna(v) else f"{v:.0f}" for v in jobs["train_seconds"]],
        "job s": ["–" if pd.isna(v) else f"{v:.0f}" for v in jobs["job_seconds"]],
        "run": [f"`{r}`" for r in jobs["run_id"]],
    })
    return table.to_markdown(index=False, disable_numparse=True)


def timing(jobs: pd.DataFrame, wall_seconds: float | None, launcher: str) -> str:
    """One sweep's speed: its wall time against the sum of its jobs' own times."""
    job_sum = jobs["job_seconds"].sum(skipna=True)
    train_sum = jobs["train_seconds"].sum(skipna=True)
    if wall_seconds is None or not job_sum > 0:
        return (f"The jobs' own times sum to {job_sum:.0f} s (training alone "
                f"{train_sum:.0f} s); the sweep's wall time is not recorded (no parent run, or "
                "the sweep has not ended).")
    return (f"Wall time of the sweep (its parent run, start to end): {wall_seconds:.0f} s, "
            f"launcher `{launcher}`. The jobs' own times (`job_seconds`: data, training, "
            f"testing, tracking) sum to {job_sum:.0f} s, training alone (`train_seconds`) to "
            f"{train_sum:.0f} s: wall time / sum of job times = "
            f"**{wall_seconds / job_sum:.2f}** (1 is serial; 1/n for n perfectly parallel "
            "jobs). Each job's time was measured while the others ran, so contention for "
            "memory bandwidth is inside it.")


def page(context: dict, summary: pd.DataFrame, diffs: pd.DataFrame, jobs: pd.DataFrame,
         book: dict) -> str:
    """The whole reports/sweeps/<report id>/report.md. ``context``: report_id, command,
    experiment, dataset, training, confidence, report_run (or None), and ``sweeps``: for each
    sweep its id, parent (run id or None), overrides, preset, launcher, wall_seconds."""
    sweeps = context["sweeps"]
    counts = jobs["status"].value_counts()
    status = ", ".join(f"{n} {s.lower()}" for s, n in counts.items())
    presets = sorted({sw["preset"] for sw in sweeps})
    warning = formatting.reference_warnings(presets, context["dataset"])
    level = f"{100 * context['confidence']:g}%"
    kinds = set(summary["kind"])
    if len(diffs):
        verdicts = "\n".join(f"- {verdict(pair)}" for _, pair in diffs.iterrows())
    elif len(kinds) == 1:
        verdicts = (f"This report has finished runs of {kinds.pop()} only: to compare, report "
                    "it together with a sweep of the other model (`sweep=[<uni>,<bi>]`).")
    else:
        verdicts = ("No pair of a bi and a uni configuration has two or more finished seeds "
                    "each: an interval needs at least two.")
    several = len(sweeps) > 1

    def which(sweep_id: str, before: str = "", after: str = "") -> str:
        """Names the sweep only when the report has several."""
        return f"{before}`{sweep_id}`{after}" if several else ""

    failures = jobs[jobs["status"] != "FINISHED"]
    failed_text = ("" if failures.empty else "\n\nNot included (did not finish):\n\n" + "\n".join(
        f"- job {row.job}{which(row.sweep, ' of ')} (`{row.configuration}`, seed {row.seed}), "
        f"{row.status}: {row.error or 'no error recorded'}" for row in failures.itertuples()))
    described = "; ".join(
        f"{which(sw['id'], after=': ')}`{sw['overrides']}` (preset `{sw['preset']}`, parent "
        f"run `{sw['parent'] or 'none'}`)" for sw in sweeps)
    timings = "\n\n".join(
        which(sw["id"], after=": ")
        + timing(jobs[jobs["sweep"] == sw["id"]], sw["wall_seconds"], sw["launcher"])
        for sw in sweeps)
    report_run = (f"; this report's run `{context['report_run']}`" if context["report_run"]
                  else "")
    dataset = formatting.dataset_title(context["dataset"])
    title = " + ".join(f"`{sw['id']}`" for sw in sweeps)
    return f"""# Sweep{'s' if several else ''} {title}: unidirectional vs bidirectional RNN over seeds ({dataset})

Generated by `{context['command']}` from the MLflow runs tagged with
{'these sweep ids' if several else 'this sweep id'}; do not edit by hand.
Experiment `{context['experiment']}`{report_run}.
{warning}
- Sweep{'s' if several else ''}: {described}.
- Jobs: {len(jobs)} ({status}).
- Training: {context['training']}.
- Test set: the 10,000 {dataset} test images. "Best" parameters are those with the lowest
  validation loss, "last" those after the final update. A seed sets the initialisation and
  the shuffling; the data split is the same for all.

## Test results over seeds

{summary_markdown(summary, book)}

Standard deviations are the sample standard deviations over seeds (n − 1). The book's rows
are its printed single runs (`data/book/table_19_12.yaml`).

![Test accuracy and loss of every seed, next to the book's single runs](per_seed.png)

## Bidirectional minus unidirectional

{differences_markdown(diffs) if len(diffs) else ""}

{verdicts}

Intervals: Welch's t ({level}), which does not assume equal variances; degrees of freedom by
Welch–Satterthwaite. Positive accuracy and negative loss differences favour bi.

## Runs

{runs_markdown(jobs)}{failed_text}

## Timing

{timings}

CSV files with full precision: `runs.csv` (one row per job), `summary.csv` (per
configuration), `differences.csv` (bi minus uni); the finished runs' per-image test
predictions (best and last parameters) and the test labels in `predictions.npz`, where the
runs logged them.
"""


PARENT_METRICS_MAX = 6  # with the sweep's own four (callback.py): ten charts on the parent


def parent_metrics(summary: pd.DataFrame, diffs: pd.DataFrame) -> dict[str, float]:
    """The headline as metrics of the sweep's parent run: each bi - uni difference in test
    accuracy (best parameters) with its interval (``bi-uni.test_acc_best.diff``, ``.low``,
    ``.high``), then each configuration's mean (``uni.test_acc_best.mean``), the first
    PARENT_METRICS_MAX of them; every number is in the report's summary.csv and
    differences.csv. (Labels with characters MLflow refuses get '_'.)"""
    def key(text: str) -> str:
        return "".join(c if c.isalnum() or c in "_-. /:" else "_" for c in text)

    metric = test_metric("acc", "best")
    metrics = {}
    for _, pair in diffs.iterrows():
        for field in ("diff", "low", "high"):
            metrics[key(f"{pair['bi']}-{pair['uni']}.{metric}.{field}")] = pair[f"{metric}_{field}"]
    for _, row in summary.iterrows():
        if not math.isnan(row[f"{metric}_mean"]):
            metrics[key(f"{row['configuration']}.{metric}.mean")] = row[f"{metric}_mean"]
    return dict(list(metrics.items())[:PARENT_METRICS_MAX])


def parent_description(sweep_id: str, command: str, jobs: int, diffs: pd.DataFrame,
                       summary: pd.DataFrame, figure_link: str) -> str:
    """The sweep parent run's description once its report ran: the verdicts (or the means),
    the per-seed figure (``figure_link``: a URL the UI loads), where the rest is."""
    if len(diffs):
        result = "\n".join(f"- {verdict(pair)}" for _, pair in diffs.iterrows())
    else:
        metric = test_metric("acc", "best")
        result = "\n".join(f"- `{row['configuration']}`: mean test accuracy (best parameters) "
                           f"{100 * row[f'{metric}_mean']:.2f}% over {row['seeds']} seeds"
                           for _, row in summary.iterrows())
    return (f"Sweep `{sweep_id}`: `{command}`, {jobs} jobs, each a training run folded under "
            f"this one.\n\n**Result**\n\n{result}\n\n"
            f"![Test accuracy and loss of every seed]({figure_link})\n\n"
            "The whole report: `report/report.md`; every number: `report/summary.csv`, "
            "`report/differences.csv`, `report/runs.csv` (Artifacts).")
