"""The study's statistics against their definitions, computed another way."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from study import statistics

A = np.array([0.951, 0.948, 0.955, 0.950, 0.953, 0.947])
B = np.array([0.944, 0.946, 0.941, 0.949, 0.943, 0.940, 0.945])


def test_welch_difference_and_interval_follow_the_textbook_formula():
    r = statistics.compare(A, B, 0.95)
    va, vb = A.var(ddof=1) / len(A), B.var(ddof=1) / len(B)
    dof = (va + vb) ** 2 / (va ** 2 / (len(A) - 1) + vb ** 2 / (len(B) - 1))
    half = stats.t.ppf(0.975, dof) * math.sqrt(va + vb)
    diff = A.mean() - B.mean()
    assert r["diff"] == pytest.approx(diff)
    assert (r["low"], r["high"]) == pytest.approx((diff - half, diff + half))
    assert r["dof"] == pytest.approx(dof)
    assert r["p"] == pytest.approx(2 * stats.t.sf(diff / math.sqrt(va + vb), dof))


def test_the_paired_analysis_uses_only_the_seeds_both_groups_ran():
    # Seeds 0..5 for a, 1..7 for b: five shared seeds, matched by seed, not by position.
    r = statistics.compare(A, B, 0.95, a_seeds=range(6), b_seeds=range(1, 8))
    shared_b = {seed: value for seed, value in zip(range(1, 8), B)}
    differences = np.array([A[s] - shared_b[s] for s in range(1, 6)])
    assert r["n_pairs"] == 5
    assert r["paired_diff"] == pytest.approx(differences.mean())
    half = stats.t.ppf(0.975, 4) * differences.std(ddof=1) / math.sqrt(5)
    assert (r["paired_low"], r["paired_high"]) == pytest.approx(
        (differences.mean() - half, differences.mean() + half))


def test_effect_sizes():
    a, b = np.array([3.0, 1.0, 2.0]), np.array([2.0, 0.0, 1.0, 2.0])
    # a > b in 7 of 12 pairs, 3 ties (a=1,b=1; a=2,b=2 twice) count half
    assert statistics.probability_of_superiority(a, b) == pytest.approx((7 + 1.5) / 12)
    pooled = (2 * a.var(ddof=1) + 3 * b.var(ddof=1)) / 5
    assert statistics.cohens_d(a, b) == pytest.approx((a.mean() - b.mean()) / math.sqrt(pooled))


def test_the_detectable_effect_is_found_with_the_stated_power():
    effect = statistics.detectable_effect(0.006, 0.004, 10, 10, 0.05)
    assert statistics.welch_power(effect, 0.006, 0.004, 10, 10, 0.05) == pytest.approx(0.8)
    # more seeds, smaller detectable effect
    assert statistics.detectable_effect(0.006, 0.004, 40, 40, 0.05) < effect


def test_power_and_the_detectable_effect_by_simulation():
    # Simulated Welch tests (4,000 designs) at the detectable effect reject 80% of the time.
    effect = statistics.detectable_effect(1.0, 0.7, 8, 12, 0.05)
    rng = np.random.default_rng(1)
    a = rng.normal(effect, 1.0, (4000, 8))
    b = rng.normal(0.0, 0.7, (4000, 12))
    rejected = stats.ttest_ind(a, b, axis=1, equal_var=False).pvalue < 0.05
    assert rejected.mean() == pytest.approx(0.8, abs=0.025)


def test_holm_counts_a_missing_test_as_p_one():
    assert statistics.holm([0.01, 0.04, 0.02]) == pytest.approx([0.03, 0.04, 0.04])
    assert statistics.holm([0.01, 0.011]) == pytest.approx([0.02, 0.02])  # step-down maximum
    adjusted = statistics.holm([0.01, None, 0.04, 0.02])
    assert adjusted[1] is None
    assert adjusted[0] == pytest.approx(0.04) and adjusted[3] == pytest.approx(0.06)
    assert adjusted[2] == pytest.approx(0.08)  # (4 - 2) x 0.04: the missing test ranks last


def test_a_two_group_contrast_is_welchs_difference():
    r = statistics.contrast([A, B], [1, -1], 0.95)
    welch = statistics.compare(A, B, 0.95)
    for key in ("diff", "low", "high", "dof", "p"):
        assert r[key] == pytest.approx(welch[key])


def test_the_interaction_contrast():
    rng = np.random.default_rng(0)
    groups = [rng.normal(m, 0.01, 10) for m in (0.95, 0.94, 0.93, 0.93)]
    r = statistics.contrast(groups, [1, -1, -1, 1], 0.95)
    means = [g.mean() for g in groups]
    assert r["diff"] == pytest.approx(means[0] - means[1] - means[2] + means[3])
    terms = [g.var(ddof=1) / 10 for g in groups]
    dof = sum(terms) ** 2 / sum(t * t / 9 for t in terms)
    assert r["dof"] == pytest.approx(dof)
    half = stats.t.ppf(0.975, dof) * math.sqrt(sum(terms))
    assert (r["low"], r["high"]) == pytest.approx((r["diff"] - half, r["diff"] + half))
    assert r["p"] == pytest.approx(2 * stats.t.sf(abs(r["diff"]) / math.sqrt(sum(terms)), dof))


def test_verdict_words():
    assert statistics.verdict(0.01, True) == "bi better"
    assert statistics.verdict(-0.01, True) == "uni better"
    assert statistics.verdict(0.01, False) == "cannot tell"
    assert statistics.verdict(0.01, True, "bi mean", "bi sum") == "bi mean better"


def test_mcnemar_counts_the_discordant_images():
    uni = np.array([True] * 90 + [False] * 10 + [True] * 2)
    bi = np.array([True] * 90 + [True] * 10 + [False] * 2)
    r = statistics.mcnemar(uni, bi, 0.95)
    assert (r["uni_only"], r["bi_only"], r["images"]) == (2, 10, 102)
    assert r["p"] == pytest.approx(stats.binomtest(10, 12, 0.5).pvalue)
    assert r["diff"] == pytest.approx(8 / 102)
    # the bootstrap interval over images is about the normal approximation's
    se = math.sqrt((10 + 2) / 102 - (8 / 102) ** 2) / math.sqrt(102)
    assert (r["low"], r["high"]) == pytest.approx((8 / 102 - 1.96 * se, 8 / 102 + 1.96 * se),
                                                  abs=0.015)
    with pytest.raises(ValueError):
        statistics.mcnemar(uni, bi[:-1], 0.95)
