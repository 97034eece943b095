"""Statistics over a sweep's seeds: per-configuration summaries (pandas) and Welch's interval
for the difference of bi and uni means (scipy), from the job table of pipeline.sweeps.runs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import pandas as pd
from scipy import stats

from pipeline.metric_names import TEST_METRICS

KIND_ORDER = {"uni": 0, "bi": 1}  # the book's order
FIELDS = ("mean", "std", "min", "max")


def finished(jobs: pd.DataFrame) -> pd.DataFrame:
    return jobs[jobs["status"] == "FINISHED"]


def configurations(done: pd.DataFrame) -> list[str]:
    """The configuration labels, uni's before bi's."""
    return sorted(done["configuration"].unique(),
                  key=lambda label: (KIND_ORDER.get(label.split()[0], 2), label))


def summarize(jobs: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration of the finished jobs: its kind, parameter count, seeds, and
    <metric>_mean / _std (n - 1) / _min / _max of every test metric."""
    done = finished(jobs)
    grouped = done.groupby("configuration", sort=False)
    table = grouped[list(TEST_METRICS)].agg(list(FIELDS))
    table.columns = [f"{metric}_{field}" for metric, field in table.columns]
    info = grouped.agg(kind=("kind", "first"), param_count=("param_count", "first"),
                       seeds=("seed", "size"),
                       seed_list=("seed", lambda s: " ".join(str(v) for v in sorted(s))))
    info["param_count"] = info["param_count"].astype(int)
    summary = info.join(table).reset_index()
    order = {label: i for i, label in enumerate(configurations(done))}
    return summary.sort_values("configuration", key=lambda c: c.map(order)).reset_index(drop=True)


@dataclass(frozen=True)
class WelchInterval:
    difference: float  # mean(a) - mean(b)
    dof: float  # Welch–Satterthwaite; inf when neither sample has any spread
    low: float
    high: float


def welch_interval(a: Sequence[float], b: Sequence[float], confidence: float = 0.95
                   ) -> WelchInterval:
    """Confidence interval for mean(a) - mean(b) without assuming equal variances."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Welch's interval needs at least 2 values in each sample, "
                         f"got {len(a)} and {len(b)}")
    difference = math.fsum(a) / len(a) - math.fsum(b) / len(b)
    if pd.Series(a).std() == 0 and pd.Series(b).std() == 0:  # no spread: scipy gives NaN
        return WelchInterval(difference, math.inf, difference, difference)
    result = stats.ttest_ind(a, b, equal_var=False)
    interval = result.confidence_interval(confidence_level=confidence)
    return WelchInterval(difference, float(result.df), float(interval.low),
                         float(interval.high))


def welch_power(difference: float, sd_a: float, sd_b: float, n: int,
                confidence: float = 0.95) -> float:
    """The chance that Welch's two-sided test at ``confidence`` finds a true ``difference``
    with ``n`` seeds per group and these standard deviations (noncentral t)."""
    variance = (sd_a ** 2 + sd_b ** 2) / n
    dof = variance ** 2 / ((sd_a ** 4 + sd_b ** 4) / (n ** 2 * (n - 1)))
    shift = abs(difference) / math.sqrt(variance)
    critical = stats.t.ppf((1 + confidence) / 2, dof)
    return float(stats.nct.sf(critical, dof, shift) + stats.nct.cdf(-critical, dof, shift))


def seeds_needed(difference: float, sd_a: float, sd_b: float, confidence: float = 0.95,
                 power: float = 0.8, limit: int = 100_000) -> int | None:
    """The fewest seeds per group for which Welch's test has ``power`` to find ``difference``;
    None if no difference, or more than ``limit``."""
    if difference == 0 or not (sd_a > 0 or sd_b > 0):
        return None
    low, high = 2, 2
    while welch_power(difference, sd_a, sd_b, high, confidence) < power:
        if high >= limit:
            return None
        low, high = high, min(limit, high * 2)
    while low < high:  # power grows with n: bisect for the first n that reaches it
        middle = (low + high) // 2
        if welch_power(difference, sd_a, sd_b, middle, confidence) >= power:
            high = middle
        else:
            low = middle + 1
    return high


def differences(jobs: pd.DataFrame, confidence: float) -> pd.DataFrame:
    """Welch's interval of mean(bi) - mean(uni) for every test metric, for every pair of a bi
    and a uni configuration that both have at least two finished seeds."""
    done = finished(jobs)
    labels = configurations(done)
    rows = []
    for bi in (label for label in labels if label.split()[0] == "bi"):
        for uni in (label for label in labels if label.split()[0] == "uni"):
            a = done[done["configuration"] == bi]
            b = done[done["configuration"] == uni]
            if len(a) < 2 or len(b) < 2:
                continue
            row = {"bi": bi, "uni": uni, "bi_seeds": len(a), "uni_seeds": len(b),
                   "bi_param_count": int(a["param_count"].iloc[0]),
                   "uni_param_count": int(b["param_count"].iloc[0]), "confidence": confidence}
            for metric in TEST_METRICS:
                interval = welch_interval(a[metric].tolist(), b[metric].tolist(), confidence)
                row.update({f"{metric}_diff": interval.difference,
                            f"{metric}_low": interval.low, f"{metric}_high": interval.high,
                            f"{metric}_dof": interval.dof,
                            f"{metric}_seeds_needed": seeds_needed(
                                interval.difference, a[metric].std(), b[metric].std(),
                                confidence)})
            rows.append(row)
    return pd.DataFrame(rows)
