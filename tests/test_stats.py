"""The sweep report's statistics against hand computations and printed tables.

Student's t quantiles are checked against the standard printed table (two-sided 95% and 99%
columns, three decimals, as in any statistics textbook's appendix), Welch's interval against
small samples worked by hand and against Wikipedia's worked example of Welch's t-test.
"""

from __future__ import annotations

import math

import pytest

from pipeline import stats


def test_describe_small_sample_by_hand():
    # mean (0.94 + 0.95 + 0.97) / 3 = 0.95333...; deviations -0.01333, -0.00333, 0.01667;
    # squares sum 0.000466667; / (n - 1) = 0.000233333; sd = 0.0152753
    summary = stats.describe([0.94, 0.95, 0.97])
    assert summary.n == 3
    assert summary.mean == pytest.approx(0.953333333, abs=1e-9)
    assert summary.std == pytest.approx(math.sqrt(0.00046666667 / 2), rel=1e-7)
    assert summary.std == pytest.approx(0.0152753, abs=1e-7)
    assert (summary.min, summary.max) == (0.94, 0.97)


def test_describe_one_value_has_no_spread():
    summary = stats.describe([0.9517])
    assert summary.mean == 0.9517 and math.isnan(summary.std)
    with pytest.raises(ValueError):
        stats.describe([])


# (degrees of freedom, cumulative probability, the table's value)
T_TABLE = [
    (1, 0.975, 12.706), (2, 0.975, 4.303), (3, 0.975, 3.182), (4, 0.975, 2.776),
    (5, 0.975, 2.571), (8, 0.975, 2.306), (10, 0.975, 2.228), (20, 0.975, 2.086),
    (30, 0.975, 2.042), (120, 0.975, 1.980),
    (1, 0.995, 63.657), (5, 0.995, 4.032), (10, 0.995, 3.169), (30, 0.995, 2.750),
    (10, 0.95, 1.812), (10, 0.90, 1.372),
]


@pytest.mark.parametrize("dof, p, printed", T_TABLE)
def test_t_quantile_matches_the_printed_table(dof, p, printed):
    assert stats.t_quantile(p, dof) == pytest.approx(printed, abs=5e-4)
    assert stats.t_quantile(1 - p, dof) == pytest.approx(-printed, abs=5e-4)  # symmetry


def test_t_cdf_closed_forms():
    # dof 1 is the Cauchy distribution: F(t) = 1/2 + atan(t)/pi;
    # dof 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2)).
    for t in (-30.0, -2.0, -0.5, 0.0, 0.3, 1.0, 4.0, 100.0):
        assert stats.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-13)
        assert stats.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-13)


def test_t_quantile_inverts_the_cdf_for_fractional_dof():
    for dof in (1.3, 3.7, 7.25, 24.99, 500.0):
        for p in (0.6, 0.9, 0.975, 0.999):
            assert stats.t_cdf(stats.t_quantile(p, dof), dof) == pytest.approx(p, abs=1e-12)


def test_t_quantile_approaches_the_normal():
    assert stats.t_quantile(0.975, 1e8) == pytest.approx(1.959964, abs=1e-6)
    assert stats.t_quantile(0.975, 1e5) == pytest.approx(1.959964, abs=1e-4)


def test_welch_equal_sizes_and_spreads_by_hand():
    # a = 1, 2, 3; b = 4, 5, 6: both variances 1, se^2 = 1/3 + 1/3, dof = 2 (n - 1) = 4 exactly,
    # so the interval is -3 +- t(0.975, 4) sqrt(2/3) = -3 +- 2.776 * 0.816497.
    interval = stats.welch_interval([1, 2, 3], [4, 5, 6])
    assert interval.difference == -3.0
    assert interval.standard_error == pytest.approx(math.sqrt(2 / 3), rel=1e-12)
    assert interval.dof == pytest.approx(4.0, rel=1e-12)
    assert interval.t_critical == pytest.approx(2.776, abs=5e-4)
    assert interval.low == pytest.approx(-3 - 2.776 * 0.816497, abs=1e-3)
    assert interval.high == pytest.approx(-3 + 2.776 * 0.816497, abs=1e-3)


def test_welch_satterthwaite_dof_by_hand():
    # a = 1, 2, 3 (variance 1, n 3); b = 2, 4, 6, 8 (variance 20/3, n 4):
    # s_a^2/n_a = 1/3, s_b^2/n_b = 5/3, se^2 = 2;
    # dof = 2^2 / ((1/3)^2 / 2 + (5/3)^2 / 3) = 4 / (1/18 + 25/27) = 216/53.
    interval = stats.welch_interval([1, 2, 3], [2, 4, 6, 8])
    assert interval.difference == -3.0
    assert interval.standard_error == pytest.approx(math.sqrt(2), rel=1e-12)
    assert interval.dof == pytest.approx(216 / 53, rel=1e-12)
    # between the table's t(0.975, 4) = 2.776 and t(0.975, 5) = 2.571, near the former
    assert 2.571 < interval.t_critical < 2.776


def test_welch_wikipedia_example():
    # https://en.wikipedia.org/wiki/Welch%27s_t-test, example 1: t = -2.46, dof = 24.99
    a = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
    b = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]
    interval = stats.welch_interval(a, b)
    assert interval.difference / interval.standard_error == pytest.approx(-2.46, abs=5e-3)
    assert interval.dof == pytest.approx(24.99, abs=5e-3)
    # the interval excludes zero, as the example's p = 0.021 < 0.05 says
    assert interval.high < 0
    assert stats.welch_interval(a, b, confidence=0.99).high > 0  # but not at 99% (p > 0.01)


def test_welch_against_scipy_when_available():
    scipy_stats = pytest.importorskip("scipy.stats")
    a, b = [0.9449, 0.9506, 0.9404, 0.9431], [0.9538, 0.9495, 0.9488, 0.9551, 0.9502]
    ours = stats.welch_interval(b, a, confidence=0.95)
    theirs = scipy_stats.ttest_ind(b, a, equal_var=False)
    low, high = theirs.confidence_interval(0.95)
    assert (ours.low, ours.high, ours.dof) == pytest.approx((low, high, theirs.df), rel=1e-9)


def test_welch_edge_cases():
    with pytest.raises(ValueError, match="at least 2"):
        stats.welch_interval([0.95], [0.94, 0.96])
    flat = stats.welch_interval([0.95, 0.95], [0.94, 0.94])
    assert flat.low == flat.high == pytest.approx(0.01) and math.isinf(flat.dof)
