"""Summaries over seeds and Welch's confidence interval for a difference of two means.

Plain Python and the standard library (scipy is not a dependency): Student's t distribution
is computed from the regularized incomplete beta function (Lentz's continued fraction, as in
Numerical Recipes, section 6.4), and its quantile by bisection, which is slow by numerical
standards (a hundred CDF evaluations) and instant for a report.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float  # sample standard deviation (n - 1 in the denominator); nan for n < 2
    min: float
    max: float


def describe(values: Sequence[float]) -> Summary:
    if not values:
        raise ValueError("describe() needs at least one value")
    values = [float(v) for v in values]
    std = statistics.stdev(values) if len(values) >= 2 else math.nan
    return Summary(n=len(values), mean=statistics.fmean(values), std=std,
                   min=min(values), max=max(values))


# ----------------------------------------------------------------------------- Student's t
def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta did not converge (a={a}, b={b}, x={x})")


def incomplete_beta(a: float, b: float, x: float, one_minus_x: float | None = None) -> float:
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1.

    ``one_minus_x``, if given, is 1 - x computed without cancellation (x near 1 would
    otherwise lose most of its digits in the subtraction).
    """
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    y = 1.0 - x if one_minus_x is None else one_minus_x
    if x == 0.0 or y == 0.0:
        return 0.0 if x == 0.0 else 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log(y))
    # The continued fraction converges fast for x < (a + 1) / (a + b + 2); use the symmetry
    # I_x(a, b) = 1 - I_{1-x}(b, a) on the other side.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, y) / b


def t_cdf(t: float, dof: float) -> float:
    """P(T <= t) for Student's t with ``dof`` (> 0, not necessarily whole) degrees of freedom."""
    if not dof > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {dof}")
    x, one_minus_x = dof / (dof + t * t), t * t / (dof + t * t)
    tail = 0.5 * incomplete_beta(dof / 2.0, 0.5, x, one_minus_x)  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, dof: float) -> float:
    """The t with P(T <= t) = p. Bisection: t_cdf is increasing, and |t| < 1e7 for every
    p in [1e-12, 1 - 1e-12] and dof >= 1 (the quantile grows like p^(-1/dof))."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if dof >= 1e7:  # lgamma's cancellation costs digits there; t and normal differ by < 1e-6
        return statistics.NormalDist().inv_cdf(p)
    if p < 0.5:
        return -t_quantile(1.0 - p, dof)
    low, high = 0.0, 1.0
    while t_cdf(high, dof) < p:
        high *= 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if t_cdf(middle, dof) < p:
            low = middle
        else:
            high = middle
        if high - low <= 1e-13 * max(1.0, high):
            break
    return 0.5 * (low + high)


# ----------------------------------------------------------------------------- Welch
@dataclass(frozen=True)
class WelchInterval:
    difference: float  # mean(a) - mean(b)
    standard_error: float
    dof: float  # Welch–Satterthwaite; inf when both samples have no spread
    t_critical: float
    low: float
    high: float
    confidence: float


def welch_interval(a: Sequence[float], b: Sequence[float], confidence: float = 0.95
                   ) -> WelchInterval:
    """Confidence interval for mean(a) - mean(b) without assuming equal variances.

    se^2 = s_a^2/n_a + s_b^2/n_b; dof = se^4 / ((s_a^2/n_a)^2/(n_a-1) + (s_b^2/n_b)^2/(n_b-1));
    interval = difference +- t_{(1+confidence)/2, dof} * se.
    """
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Welch's interval needs at least 2 values in each sample, "
                         f"got {len(a)} and {len(b)}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    va = statistics.variance(a) / len(a)
    vb = statistics.variance(b) / len(b)
    difference = statistics.fmean(a) - statistics.fmean(b)
    se = math.sqrt(va + vb)
    if se == 0.0:  # no spread at all: the difference is what it is
        return WelchInterval(difference, 0.0, math.inf, math.nan, difference, difference,
                             confidence)
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    t_critical = t_quantile((1.0 + confidence) / 2.0, dof)
    return WelchInterval(difference, se, dof, t_critical, difference - t_critical * se,
                         difference + t_critical * se, confidence)
