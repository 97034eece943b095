"""Accuracy against parameter count: per-size summaries of each model family over seeds, and
bi minus uni at equal parameter counts (uni interpolated in log parameter count, with a
bootstrap over seeds for the uncertainty)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.sweeps.statistics import finished

METRIC = "test_acc_best"  # the table's accuracy: best parameters


def with_family(jobs: pd.DataFrame) -> pd.DataFrame:
    """Finished jobs with a ``family`` column: 'uni', or 'bi (<merge>)'."""
    done = finished(jobs).copy()
    done["family"] = [kind if kind == "uni" else f"{kind} ({merge or 'sum'})"
                      for kind, merge in zip(done["kind"], done["merge"])]
    return done


def sizes(jobs: pd.DataFrame) -> pd.DataFrame:
    """One row per family and size: hidden units (per chain), parameters, seeds and the
    accuracy's mean, sd, min and max over seeds."""
    done = with_family(jobs)
    table = (done.groupby(["family", "hidden", "param_count"])[METRIC]
             .agg(seeds="size", mean="mean", std="std", min="min", max="max").reset_index())
    return table.sort_values(["family", "param_count"]).reset_index(drop=True)


def equal_size_differences(jobs: pd.DataFrame, family: str = "bi (sum)",
                           confidence: float = 0.95, resamples: int = 4000,
                           seed: int = 0) -> pd.DataFrame:
    """For every size of ``family`` within uni's range of parameter counts: its mean accuracy
    minus uni's at the same count (interpolated linearly in log parameters between uni's
    sizes), with a percentile bootstrap interval (seeds resampled within every size)."""
    done = with_family(jobs)
    rng = np.random.default_rng(seed)
    uni_groups = {p: g[METRIC].to_numpy() for p, g in done[done["family"] == "uni"]
                  .groupby("param_count")}
    uni_params = np.array(sorted(uni_groups))
    rows = []
    for (hidden, params), group in done[done["family"] == family].groupby(["hidden", "param_count"]):
        if len(uni_params) < 2 or not uni_params[0] <= params <= uni_params[-1]:
            continue
        values = group[METRIC].to_numpy()
        uni_means = np.array([uni_groups[p].mean() for p in uni_params])
        uni_at = float(np.interp(np.log(params), np.log(uni_params), uni_means))
        observed = values.mean() - uni_at
        boot = np.empty(resamples)
        for r in range(resamples):
            resampled = np.array([rng.choice(uni_groups[p], len(uni_groups[p])).mean()
                                  for p in uni_params])
            boot[r] = (rng.choice(values, len(values)).mean()
                       - np.interp(np.log(params), np.log(uni_params), resampled))
        tail = (1 - confidence) / 2
        rows.append({"family": family, "hidden": int(hidden), "param_count": int(params),
                     "seeds": len(values), "mean": values.mean(),
                     "uni_at_same_count": uni_at,
                     "difference": observed, "low": float(np.quantile(boot, tail)),
                     "high": float(np.quantile(boot, 1 - tail)), "confidence": confidence})
    return pd.DataFrame(rows)


def answer(diffs: pd.DataFrame) -> str:
    """One sentence: which family is better at equal parameter count, by how much."""
    if diffs.empty:
        return ("No bi size falls inside uni's range of parameter counts: the sweeps cannot "
                "compare the families at equal size.")
    level = f"{100 * diffs['confidence'].iloc[0]:g}%"
    above = diffs[diffs["low"] > 0]
    below = diffs[diffs["high"] < 0]
    spans = "; ".join(
        f"{row.param_count} parameters: {100 * row.difference:+.2f} points "
        f"({100 * row.low:+.2f} to {100 * row.high:+.2f})" for row in diffs.itertuples())
    if len(above) == len(diffs):
        verdict = "bi is better than uni at every size compared"
    elif len(below) == len(diffs):
        verdict = "uni is better than bi at every size compared"
    elif len(above) and not len(below):
        verdict = (f"bi is better at {len(above)} of {len(diffs)} sizes compared and no worse "
                   "at the others")
    elif len(below) and not len(above):
        verdict = (f"uni is better at {len(below)} of {len(diffs)} sizes compared and no worse "
                   "at the others")
    elif len(above) or len(below):
        verdict = "which family is better depends on the size"
    else:
        verdict = "the two families cannot be told apart at any size compared"
    return (f"At equal parameter count {verdict} (bi minus uni interpolated at bi's size, "
            f"mean test accuracy with the best parameters, {level} bootstrap intervals over "
            f"seeds: {spans}).")
