"""Section 5 of the findings page: the Optuna search of the bi net's learning-rate schedule
(``hparams_search=bi_lr``), its best trial retrained for 100 epochs over seeds, and that
against the book's schedule, from MLflow alone. ``study/conf/findings.yaml`` names the three
sweeps, in this order: ``tuned.sweeps: [<search>, <retrained>, <book seeds>]``.
"""

from __future__ import annotations

import json
import math

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from pipeline import schema
from pipeline.errors import StageError
from pipeline.reports import figures, formatting
from pipeline.sweeps import job as sweep
from pipeline.sweeps import statistics
from pipeline.sweeps import runs as sweep_runs
from pipeline.tracking import runs as tracked_runs

import matplotlib.pyplot as plt  # noqa: E402  (pipeline.reports.figures chose the Agg backend)
from matplotlib.ticker import NullFormatter  # noqa: E402

SEARCHED = ("lr", "lr_decay", "lr_decay_every")  # model.<key>: what bi_lr searches
SAME = 1e-9  # relative tolerance: a retrained value equals the trial's (logged as text)
FIGURE_LABELS = {"bi, tuned schedule": "bi, tuned", "bi, book schedule": "bi, book",
                 "uni, book schedule": "uni, book"}  # groups()' labels, short


def _number(text) -> float:
    """A logged param as a float; NaN if absent or 'None' (a run without a step schedule)."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def schedule(lr: float, decay: float, every: float, epochs: int) -> dict[int, float]:
    """The milestones of ``lr`` x ``decay`` every ``every`` of an ``epochs``-epoch run (the
    train stage's own rule, pipeline.schema.lr_milestones)."""
    model = OmegaConf.create({"lr": float(lr), "lr_decay": float(decay),
                              "lr_decay_every": float(every), "lr_milestones": {}})
    return schema.lr_milestones(model, int(epochs))


def schedule_text(lr: float, decay: float, every: float, epochs: int) -> str:
    """'0.0200, x0.50 at epochs 10, 20 of 30 (0.0100, 0.0050)'."""
    steps = schedule(lr, decay, every, epochs)
    if not steps:
        return f"{lr:.4f} constant over {epochs} epochs"
    return (f"{lr:.4f}, x{decay:.2f} at epochs {', '.join(map(str, steps))} of {epochs} "
            f"({', '.join(f'{rate:.4f}' for rate in steps.values())})")


def trials(client, search_id: str) -> pd.DataFrame:
    """One row per trial of the search (a job of the sweep): its number, status, searched
    values, epochs, best validation loss and accuracy, test accuracy of its best parameters;
    best validation loss first, failed trials last."""
    found = tracked_runs.search_runs(client, sweep.jobs_filter(sweep.check_id(search_id)))
    if not found:
        raise StageError(f"tuned: no runs of the search {search_id!r} in tracking store "
                         f"{client.tracking_uri}")
    rows = []
    for run in found:
        params, metrics = run.data.params, run.data.metrics
        rows.append({"trial": int(run.data.tags.get(sweep.JOB_TAG, -1)),
                     "status": run.info.status,
                     **{key: _number(params.get(f"model.{key}")) for key in SEARCHED},
                     "epochs": int(params.get("train.epochs", 0)),
                     "seed": int(params.get("train.seed", -1)),
                     "param_count": int(params.get("param_count", 0)),
                     "best_val_loss": metrics.get("best_val_loss", math.nan),
                     "best_val_acc": metrics.get("best_val_acc", math.nan),
                     "test_acc_best": metrics.get("test_acc_best", math.nan),
                     "run_id": run.info.run_id})
    table = pd.DataFrame(rows)
    table["ok"] = (table["status"] == "FINISHED") & table["best_val_loss"].map(math.isfinite)
    table = table.sort_values(["ok", "best_val_loss", "trial"], ascending=[False, True, True])
    return table.drop(columns="ok").reset_index(drop=True)


def best_trial(table: pd.DataFrame) -> pd.Series:
    done = table[(table["status"] == "FINISHED") & table["best_val_loss"].map(math.isfinite)]
    if done.empty:
        raise StageError("tuned: the search has no finished trial")
    return done.iloc[0]  # trials() sorts the best first


def retrain_overrides(best: pd.Series) -> list[str]:
    """The searched values of ``best`` as command-line overrides, at full precision."""
    return [f"model.{key}={float(best[key])!r}" for key in SEARCHED]


def check_retrained(client, retrained_id: str, best: pd.Series) -> int:
    """Every run of the retraining sweep used the best trial's schedule, else a one-line
    error (the section would compare the wrong thing); returns their number of epochs."""
    found = tracked_runs.search_runs(client, sweep.jobs_filter(retrained_id))
    epochs = {int(run.data.params.get("train.epochs", 0)) for run in found}
    if len(epochs) != 1:
        raise StageError(f"tuned: sweep {retrained_id!r} has no runs, or runs of several "
                         f"lengths ({sorted(epochs)} epochs)")
    for run in found:
        for key in SEARCHED:
            value = _number(run.data.params.get(f"model.{key}"))
            if not math.isclose(value, best[key], rel_tol=SAME):
                raise StageError(
                    f"tuned: sweep {retrained_id!r} (job {run.data.tags.get(sweep.JOB_TAG)}) "
                    f"trained model.{key}={value!r}, but the search's best trial "
                    f"{int(best['trial'])} has {best[key]!r}: retrain with "
                    f"{' '.join(retrain_overrides(best))}")
    return epochs.pop()


def groups(jobs: pd.DataFrame, retrained_id: str, book_id: str) -> dict[str, pd.DataFrame]:
    """The finished runs to compare, by label: the retrained best schedule, the book's bi and
    the book's uni (the last two from the book-configuration sweep)."""
    done = statistics.finished(jobs)
    book = done[done["sweep"] == book_id]
    for kind in ("bi", "uni"):
        configurations = sorted(book.loc[book["kind"] == kind, "configuration"].unique())
        if len(configurations) > 1:
            raise StageError(f"tuned: sweep {book_id!r} has several {kind} configurations "
                             f"({', '.join(configurations)}); name one of the book's alone")
    labelled = {"bi, tuned schedule": done[done["sweep"] == retrained_id],
                "bi, book schedule": book[book["kind"] == "bi"],
                "uni, book schedule": book[book["kind"] == "uni"]}
    for label, group in labelled.items():
        if len(group) < 2:
            raise StageError(f"tuned: {label} has {len(group)} finished run(s) in sweeps "
                             f"{retrained_id}, {book_id}; the comparison needs at least 2")
    return labelled


def with_val_loss(client, jobs: pd.DataFrame) -> pd.DataFrame:
    """The job table plus each run's best validation loss (the search's objective)."""
    losses = {run_id: client.get_run(run_id).data.metrics.get("best_val_loss", math.nan)
              for run_id in jobs["run_id"]}
    return jobs.assign(best_val_loss=jobs["run_id"].map(losses))


def intervals(labelled: dict[str, pd.DataFrame], confidence: float) -> pd.DataFrame:
    """Welch's intervals of tuned minus the book's bi (test accuracy best and last, test loss,
    validation loss) and of tuned minus uni (test accuracy best), with the seeds a difference
    of the observed size would need (statistics.seeds_needed)."""
    tuned, book_bi, uni = labelled.values()
    rows = []
    for other, name, metric in ((book_bi, "book bi", "test_acc_best"),
                                (book_bi, "book bi", "test_acc_last"),
                                (book_bi, "book bi", "test_loss_best"),
                                (book_bi, "book bi", "best_val_loss"),
                                (uni, "uni", "test_acc_best")):
        a, b = tuned[metric].tolist(), other[metric].tolist()
        interval = statistics.welch_interval(a, b, confidence)
        rows.append({"against": name, "metric": metric, "diff": interval.difference,
                     "low": interval.low, "high": interval.high, "dof": interval.dof,
                     "seeds_needed": statistics.seeds_needed(
                         interval.difference, pd.Series(a).std(), pd.Series(b).std(),
                         confidence)})
    return pd.DataFrame(rows)


def _test_loss(pairs: pd.DataFrame, labelled: dict[str, pd.DataFrame], level: str) -> str:
    """The test loss (the objective on data the search never saw) as a clause."""
    row = pairs[(pairs["against"] == "book bi") & (pairs["metric"] == "test_loss_best")].iloc[0]
    tuned, book_bi, _ = labelled.values()
    numbers = (f"{formatting.loss(tuned['test_loss_best'].mean())} against "
               f"{formatting.loss(book_bi['test_loss_best'].mean())} ({row['diff']:+.4f}, "
               f"{level} interval {row['low']:+.4f} to {row['high']:+.4f})")
    if row["low"] <= 0 <= row["high"]:
        return f"the mean test loss, {numbers}, does not tell them apart either"
    return f"its mean test loss is {'lower' if row['high'] < 0 else 'higher'}: {numbers}"


def answer(pairs: pd.DataFrame, labelled: dict[str, pd.DataFrame], confidence: float) -> str:
    """The one-sentence answer: tuned against the book's bi schedule on test accuracy (best
    parameters), with the interval and what it supports, then the test loss."""
    row = pairs[(pairs["against"] == "book bi") & (pairs["metric"] == "test_acc_best")].iloc[0]
    tuned, book_bi, _ = labelled.values()
    level = f"{100 * confidence:g}%"
    evidence = (f"the tuned schedule reaches {formatting.percent(tuned['test_acc_best'].mean())} "
                f"mean test accuracy over {len(tuned)} seeds against the book schedule's "
                f"{formatting.percent(book_bi['test_acc_best'].mean())} over {len(book_bi)}, a "
                f"difference of {formatting.points(row['diff'], True)} points ({level} interval "
                f"{formatting.points(row['low'], True)} to {formatting.points(row['high'], True)})")
    loss = _test_loss(pairs, labelled, level)
    if row["low"] > 0:
        return f"Yes: {evidence}, with the same 2170 parameters; {loss}."
    if row["high"] < 0:
        return f"No, it is worse: {evidence}; {loss}."
    needed = row["seeds_needed"]
    more = (f"; a true difference of this size would need {int(needed)} seeds per schedule "
            "to show with 80% power" if needed is not None and not pd.isna(needed) else "")
    return f"We cannot tell them apart: {evidence}, which contains zero{more}; {loss}."


def search_figure(table: pd.DataFrame, best: pd.Series):
    """Each trial's best validation loss against its learning rate, coloured by the decay
    factor, sized by the number of steps; the best trial circled."""
    done = table[(table["status"] == "FINISHED") & table["best_val_loss"].map(math.isfinite)]
    fig, ax = plt.subplots(figsize=(7.0, 4.4), constrained_layout=True)
    steps = [len(schedule(r.lr, r.lr_decay, r.lr_decay_every, r.epochs)) for r in done.itertuples()]
    points = ax.scatter(done["lr"], done["best_val_loss"], c=done["lr_decay"], cmap="viridis",
                        vmin=0.0, vmax=1.0, s=[30 + 25 * n for n in steps], edgecolors="k",
                        linewidths=0.5, zorder=3)
    for r in done.itertuples():
        ax.annotate(str(r.trial), (r.lr, r.best_val_loss), fontsize=7,
                    textcoords="offset points", xytext=(5, 3))
    ax.scatter([best["lr"]], [best["best_val_loss"]], s=260, facecolors="none",
               edgecolors="C3", linewidths=1.5, zorder=4, label=f"best: trial {int(best['trial'])}")
    fig.colorbar(points, ax=ax, label="decay factor per step (1: constant rate)")
    ax.set_xscale("log")
    ticks = [t for t in (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
             if done["lr"].min() / 1.5 <= t <= done["lr"].max() * 1.5]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel="learning rate from epoch 0 (log scale); labels: trial number; size: steps",
           ylabel="best validation loss", title=f"Optuna search, {int(best['epochs'])} epochs a trial")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


def _trials_markdown(table: pd.DataFrame, limit: int = 20) -> str:
    rows = [{"trial": int(r.trial), "lr": f"{r.lr:.4f}", "decay": f"{r.lr_decay:.2f}",
             "every (of the run)": f"{r.lr_decay_every:.2f}",
             "steps at epochs": ", ".join(map(str, schedule(r.lr, r.lr_decay, r.lr_decay_every,
                                                            r.epochs))) or "none",
             "validation loss": formatting.loss(r.best_val_loss),
             "validation accuracy": formatting.percent(r.best_val_acc),
             "status": r.status.lower()}
            for r in table.head(limit).itertuples()]
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)


def _groups_markdown(labelled: dict[str, pd.DataFrame]) -> str:
    def spread(values: pd.Series) -> str:
        return f"{formatting.percent(values.mean())} ± {formatting.points(values.std())}"

    rows = [{"": label, "parameters": int(group["param_count"].iloc[0]), "seeds": len(group),
             "validation loss, best": f"{formatting.loss(group['best_val_loss'].mean())} ± "
                                      f"{formatting.loss(group['best_val_loss'].std())}",
             "accuracy, best": spread(group["test_acc_best"]),
             "accuracy, last": spread(group["test_acc_last"]),
             "test loss, best": formatting.loss(group["test_loss_best"].mean())}
            for label, group in labelled.items()]
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)


def _intervals_markdown(pairs: pd.DataFrame) -> str:
    names = {"test_acc_best": "test accuracy, best (points)",
             "test_acc_last": "test accuracy, last (points)",
             "test_loss_best": "test loss, best",
             "best_val_loss": "validation loss, best"}
    rows = []
    for r in pairs.itertuples():
        if r.metric in ("test_loss_best", "best_val_loss"):
            shown = [f"{v:+.4f}" for v in (r.diff, r.low, r.high)]
        else:
            shown = [formatting.points(v, True) for v in (r.diff, r.low, r.high)]
        rows.append({"tuned bi minus": r.against, "quantity": names[r.metric],
                     "difference": shown[0], "interval": f"{shown[1]} to {shown[2]}",
                     "Welch dof": f"{r.dof:.1f}"})
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)


def _wall(client, sweep_id: str) -> str:
    parent = sweep.find_parent(client, sweep_id)
    seconds = parent.data.metrics.get("sweep_seconds") if parent is not None else None
    return f"{seconds / 60:.1f} min wall" if seconds else "wall time not recorded"


def _search_space(client, search_id: str) -> str:
    parent = sweep.find_parent(client, search_id)
    space = json.loads(parent.data.tags.get(sweep.SEARCH_SPACE_TAG, "{}")) if parent else {}
    sampler = parent.data.tags.get(sweep.SAMPLER_TAG, "") if parent else ""
    listed = "; ".join(f"`{key}`: `{value}`" for key, value in space.items())
    return (f"{sampler or 'the sampler is not recorded'}; search space {listed or 'not recorded'}")


def tuned_section(client, cfg: DictConfig, out, folder: str = "findings") -> str:
    """The findings page's section 5 (figures into ``out``, linked as ``folder``/...)."""
    finding = cfg.tuned
    if len(finding.sweeps) != 3:
        raise StageError(f"tuned.sweeps: needs [<search>, <retrained>, <book seeds>], got "
                         f"{list(finding.sweeps)}")
    search_id, retrained_id, book_id = (sweep.check_id(i, "tuned.sweeps") for i in finding.sweeps)
    table = trials(client, search_id)
    best = best_trial(table)
    retrained_epochs = check_retrained(client, retrained_id, best)
    try:
        found = sweep_runs.fetch(client, [retrained_id, book_id])
    except StageError as exc:
        raise StageError(f"tuned: {exc}") from None
    if ";" in found.training:  # formatting.training_settings of each run, joined
        raise StageError(f"tuned: sweeps {retrained_id} and {book_id} trained differently "
                         f"({found.training}); compare runs of one length and data")
    labelled = groups(with_val_loss(client, found.jobs), retrained_id, book_id)
    pairs = intervals(labelled, cfg.confidence)

    table.to_csv(out / "tuned_trials.csv", index=False)
    figures.save_png(search_figure(table, best), out / "tuned_search.png")
    columns = [f"{FIGURE_LABELS[label]}\n({len(group)} seeds)" for label, group in labelled.items()]
    per_seed = pd.concat([group.assign(configuration=column)
                          for column, group in zip(columns, labelled.values())])
    figures.save_png(figures.per_seed(per_seed, columns, {}), out / "tuned_per_seed.png")

    failed = table[table["status"] != "FINISHED"]
    failures = (f" {len(failed)} trial(s) failed (trial {', '.join(map(str, failed['trial']))}) "
                "and counted as the worst loss." if len(failed) else "")
    epochs, steps = int(best["epochs"]), [best[key] for key in SEARCHED]
    seeds = ", ".join(map(str, sorted(table["seed"].unique())))
    return f"""**Question.** Does a learning-rate schedule tuned for the bidirectional net, with
the book's architecture (2170 parameters, fewer than uni's 2282), beat the book's schedule?

**Answer.** {answer(pairs, labelled, cfg.confidence)}

**The search.** Sweep `{search_id}`: {len(table)} trials of {epochs} epochs (training seed
{seeds}), {_wall(client, search_id)}, each an MLflow run nested under the parent run
`sweep {search_id}`. Optuna's {_search_space(client, search_id)}; objective: the best
validation loss of the trial.{failures}

The best trial, {int(best['trial'])} (validation loss {formatting.loss(best['best_val_loss'])}),
starts at a learning rate of {schedule_text(*steps, epochs)}; over {retrained_epochs} epochs
the same fractions of the run give {schedule_text(*steps, retrained_epochs)}. The book's bi
schedule is 0.01, then 0.008 / 0.005 / 0.002 from epochs 30 / 50 / 70.

{_trials_markdown(table)}

![Validation loss of every trial]({folder}/tuned_search.png)

**Retrained.** Sweep `{retrained_id}` ({_wall(client, retrained_id)}) against the book
configuration of sweep `{book_id}`; both {found.training}. Means ± sample standard deviations
over seeds:

{_groups_markdown(labelled)}

{_intervals_markdown(pairs)}

Intervals: Welch's t at {100 * cfg.confidence:g}%. The validation set chose the schedule, so
the validation-loss difference flatters it; the test set took no part. Only bi's schedule was
tuned (uni keeps the book's constant 0.005), so "tuned bi minus uni" does not compare the
architectures on equal terms.

![Per-seed test results of the tuned and the book's schedules]({folder}/tuned_per_seed.png)

```bash
{chr(10).join(finding.commands)}
```"""
