"""The study's statistics for one group of seeds minus another: Welch's test and interval, the paired
analysis by seed, effect sizes, the smallest effect the design detects, Holm's adjustment, and
McNemar's test on one pair of models' test predictions (scipy)."""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize, stats

POWER = 0.8  # for the smallest detectable effect


def welch_power(difference: float, sd_a: float, sd_b: float, n_a: int, n_b: int,
                alpha: float) -> float:
    """The chance that Welch's two-sided test at level ``alpha`` finds a true ``difference``
    with these group sizes and standard deviations (noncentral t)."""
    va, vb = sd_a ** 2 / n_a, sd_b ** 2 / n_b
    dof = (va + vb) ** 2 / (va ** 2 / (n_a - 1) + vb ** 2 / (n_b - 1))
    shift = abs(difference) / math.sqrt(va + vb)
    critical = stats.t.ppf(1 - alpha / 2, dof)
    power = stats.nct.sf(critical, dof, shift) + stats.nct.cdf(-critical, dof, shift)
    return 1.0 if math.isnan(power) else float(power)  # scipy's NaN: far out, where it is 1


def detectable_effect(sd_a: float, sd_b: float, n_a: int, n_b: int, alpha: float,
                      power: float = POWER) -> float:
    """The smallest true difference Welch's test at ``alpha`` finds with ``power``, for
    these group sizes and (observed) standard deviations."""
    scale = math.sqrt(sd_a ** 2 / n_a + sd_b ** 2 / n_b)
    if scale == 0:
        return 0.0
    return float(optimize.brentq(
        lambda d: welch_power(d, sd_a, sd_b, n_a, n_b, alpha) - power, 1e-12 * scale,
        100 * scale))


def probability_of_superiority(a: np.ndarray, b: np.ndarray) -> float:
    """How often a random value of ``a`` exceeds a random value of ``b`` (ties count half):
    the Mann-Whitney U of a over len(a) * len(b)."""
    greater = (a[:, None] > b[None, :]).sum()
    ties = (a[:, None] == b[None, :]).sum()
    return float((greater + ties / 2) / (len(a) * len(b)))


def cohens_d(a: np.ndarray, b: np.ndarray) -> float:
    """mean(a) - mean(b) over the pooled sample standard deviation."""
    pooled = ((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2)
    return float((a.mean() - b.mean()) / math.sqrt(pooled)) if pooled > 0 else math.nan


def compare(a: np.ndarray, b: np.ndarray, confidence: float, a_seeds=None, b_seeds=None) -> dict:
    """a minus b: group sizes, means, sds; Welch's difference, interval, degrees of freedom
    and p; Cohen's d; P(a > b) for a random seed of each; the smallest difference the design
    detects; and, over the seeds both groups ran (the same seed gives both models the same
    batch order), the paired difference, interval and p."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"a comparison needs at least 2 seeds a side, got {len(a)} and {len(b)}")
    welch = stats.ttest_ind(a, b, equal_var=False)
    interval = welch.confidence_interval(confidence_level=confidence)
    row = {"n_a": len(a), "n_b": len(b), "mean_a": a.mean(), "mean_b": b.mean(),
           "sd_a": a.std(ddof=1), "sd_b": b.std(ddof=1),
           "diff": a.mean() - b.mean(), "low": float(interval.low),
           "high": float(interval.high), "dof": float(welch.df), "p": float(welch.pvalue),
           "cohens_d": cohens_d(a, b), "p_superiority": probability_of_superiority(a, b),
           "detectable": detectable_effect(a.std(ddof=1), b.std(ddof=1), len(a), len(b),
                                           1 - confidence),
           "n_pairs": 0, "paired_diff": math.nan, "paired_low": math.nan,
           "paired_high": math.nan, "paired_p": math.nan}
    if a_seeds is not None and b_seeds is not None:
        b_by_seed = dict(zip(b_seeds, b))
        pairs = [(x, b_by_seed[s]) for s, x in zip(a_seeds, a) if s in b_by_seed]
        if len(pairs) >= 2:
            x, y = np.array(pairs).T
            paired = stats.ttest_rel(x, y)
            span = paired.confidence_interval(confidence_level=confidence)
            row.update(n_pairs=len(pairs), paired_diff=float((x - y).mean()),
                       paired_low=float(span.low), paired_high=float(span.high),
                       paired_p=float(paired.pvalue))
    return row


def contrast(groups: list[np.ndarray], weights: list[float], confidence: float) -> dict:
    """A linear contrast of group means, sum(w_i mean_i), e.g. the interaction (a - b) -
    (c - d) with weights (1, -1, -1, 1): its value, interval and two-sided p, with Welch-
    Satterthwaite degrees of freedom (unequal variances)."""
    groups = [np.asarray(g, dtype=float) for g in groups]
    terms = [w * w * g.var(ddof=1) / len(g) for g, w in zip(groups, weights)]
    value = float(sum(w * g.mean() for g, w in zip(groups, weights)))
    se = math.sqrt(sum(terms))
    dof = sum(terms) ** 2 / sum(t * t / (len(g) - 1) for t, g in zip(terms, groups))
    half = stats.t.ppf((1 + confidence) / 2, dof) * se
    return {"diff": value, "low": value - half, "high": value + half, "dof": dof,
            "p": float(2 * stats.t.sf(abs(value) / se, dof))}


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values over the whole family; a test without data (None)
    counts in the family as p = 1, so adding its data later can only keep or lower the
    others' adjusted values. None stays None."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: 1.0 if pvalues[i] is None else pvalues[i])
    adjusted: list[float | None] = [None] * m
    running = 0.0
    for rank, i in enumerate(order):
        p = 1.0 if pvalues[i] is None else pvalues[i]
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = None if pvalues[i] is None else running
    return adjusted


def verdict(diff: float, significant: bool, a: str = "bi", b: str = "uni") -> str:
    """'<a> better', '<b> better' or 'cannot tell' for a difference a - b."""
    if not significant:
        return "cannot tell"
    return f"{a} better" if diff > 0 else f"{b} better"


def mcnemar(uni_correct: np.ndarray, bi_correct: np.ndarray, confidence: float,
            resamples: int = 10_000, seed: int = 0) -> dict:
    """One pair of models on the same test images: the images only one of them gets right
    (uni only: ``uni_only``, bi only: ``bi_only``), McNemar's exact p (binomial on the
    discordant images), and bi's accuracy minus uni's with a bootstrap interval over test
    images (resampling images; each image's difference is -1, 0 or 1, so the resampled
    counts are multinomial)."""
    uni_correct, bi_correct = np.asarray(uni_correct, bool), np.asarray(bi_correct, bool)
    if uni_correct.shape != bi_correct.shape:
        raise ValueError(f"predictions of {len(uni_correct)} and {len(bi_correct)} images")
    n = len(uni_correct)
    uni_only = int((uni_correct & ~bi_correct).sum())
    bi_only = int((bi_correct & ~uni_correct).sum())
    p = float(stats.binomtest(bi_only, uni_only + bi_only, 0.5).pvalue) if uni_only + bi_only \
        else 1.0
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, [bi_only / n, uni_only / n, 1 - (bi_only + uni_only) / n],
                             size=resamples)
    resampled = (counts[:, 0] - counts[:, 1]) / n
    tail = (1 - confidence) / 2
    return {"images": n, "uni_only": uni_only, "bi_only": bi_only, "p": p,
            "acc_uni": float(uni_correct.mean()), "acc_bi": float(bi_correct.mean()),
            "diff": (bi_only - uni_only) / n, "low": float(np.quantile(resampled, tail)),
            "high": float(np.quantile(resampled, 1 - tail))}
