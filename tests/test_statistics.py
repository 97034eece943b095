"""Welch's interval (scipy, as the sweep report calls it) against small samples worked by hand
and Wikipedia's worked example of Welch's t-test: the orientation (a - b), the degrees of
freedom and the confidence level. Summaries over seeds: tests/test_sweep_report.py."""

from __future__ import annotations

import math

import pytest

from pipeline.sweeps import statistics


def test_welch_equal_sizes_and_spreads_by_hand():
    # a = 1, 2, 3; b = 4, 5, 6: both variances 1, se^2 = 1/3 + 1/3, dof = 2 (n - 1) = 4 exactly,
    # so the interval is -3 +- t(0.975, 4) sqrt(2/3) = -3 +- 2.776 * 0.816497 (printed table).
    interval = statistics.welch_interval([1, 2, 3], [4, 5, 6])
    assert interval.difference == -3.0
    assert interval.dof == pytest.approx(4.0, rel=1e-12)
    assert interval.low == pytest.approx(-3 - 2.776 * 0.816497, abs=1e-3)
    assert interval.high == pytest.approx(-3 + 2.776 * 0.816497, abs=1e-3)


def test_welch_satterthwaite_dof_by_hand():
    # a = 1, 2, 3 (variance 1, n 3); b = 2, 4, 6, 8 (variance 20/3, n 4):
    # s_a^2/n_a = 1/3, s_b^2/n_b = 5/3, se^2 = 2;
    # dof = 2^2 / ((1/3)^2 / 2 + (5/3)^2 / 3) = 4 / (1/18 + 25/27) = 216/53.
    interval = statistics.welch_interval([1, 2, 3], [2, 4, 6, 8])
    assert interval.difference == -3.0
    assert interval.dof == pytest.approx(216 / 53, rel=1e-12)
    # half-width / se lies between the table's t(0.975, 5) = 2.571 and t(0.975, 4) = 2.776
    assert 2.571 < (interval.high - interval.difference) / math.sqrt(2) < 2.776


def test_welch_wikipedia_example():
    # https://en.wikipedia.org/wiki/Welch%27s_t-test, example 1: t = -2.46, dof = 24.99
    a = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
    b = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]
    interval = statistics.welch_interval(a, b)
    assert interval.dof == pytest.approx(24.99, abs=5e-3)
    # the interval excludes zero, as the example's p = 0.021 < 0.05 says, but not at 99%
    assert interval.high < 0
    assert statistics.welch_interval(a, b, confidence=0.99).high > 0


def test_welch_edge_cases():
    with pytest.raises(ValueError, match="at least 2"):
        statistics.welch_interval([0.95], [0.94, 0.96])
    flat = statistics.welch_interval([0.95, 0.95], [0.94, 0.94])
    assert flat.low == flat.high == pytest.approx(0.01) and math.isinf(flat.dof)


def test_seeds_needed_matches_the_textbook_sample_size():
    # Cohen's d = 0.5 at alpha 0.05, power 0.8: 63.77 per group (statsmodels' TTestIndPower,
    # and Cohen's table: 64), so 64 seeds.
    assert statistics.seeds_needed(0.5, 1.0, 1.0) == 64
    assert statistics.welch_power(0.5, 1.0, 1.0, 64) >= 0.8 > statistics.welch_power(0.5, 1.0, 1.0, 63)
    # d = 0.8: 25.5 per group -> 26; the sign of the difference does not matter
    assert statistics.seeds_needed(-0.8, 1.0, 1.0) == 26
    assert statistics.seeds_needed(0.0, 1.0, 1.0) is None
