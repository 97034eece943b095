"""The pre-registered two-level bootstrap and Holm-level intervals (study/bootstrap.py),
against a direct implementation of the registered procedure and the properties it promises."""

from __future__ import annotations

import numpy as np
import pytest

from study import bootstrap


def cells(rng, accuracies: dict, images: int = 300, seeds: int = 6) -> dict:
    return {cell: rng.random((seeds, images)) < p for cell, p in accuracies.items()}


def direct(correct: dict, contrasts: dict, resamples: int, seed: int) -> dict:
    """The registered procedure written out one resample at a time."""
    rng = np.random.default_rng(seed)
    n = next(iter(correct.values())).shape[1]
    out = {name: [] for name in contrasts}
    for _ in range(resamples):
        images = rng.integers(0, n, n)
        means = {}
        for cell, matrix in correct.items():
            runs = rng.integers(0, len(matrix), len(matrix))
            means[cell] = matrix[runs][:, images].mean()
        for name, weights in contrasts.items():
            out[name].append(sum(w * means[c] for c, w in weights.items()))
    return {name: np.array(v) for name, v in out.items()}


CONTRASTS = {"arch": {"bi c": 0.5, "bi s": 0.5, "uni c": -0.5, "uni s": -0.5},
             "sched": {"uni s": 0.5, "bi s": 0.5, "uni c": -0.5, "bi c": -0.5}}


def test_the_bootstrap_follows_the_registered_draws_exactly():
    correct = cells(np.random.default_rng(1), {"uni c": 0.90, "bi s": 0.93, "uni s": 0.92,
                                               "bi c": 0.905})
    point, values = bootstrap.resampled_contrasts(correct, CONTRASTS, resamples=37, seed=5,
                                                  chunk=10)
    expected = direct(correct, CONTRASTS, 37, 5)
    for name in CONTRASTS:
        assert values[name] == pytest.approx(expected[name], abs=1e-12)
    means = {c: m.mean() for c, m in correct.items()}
    assert point["arch"] == pytest.approx((means["bi c"] + means["bi s"] - means["uni c"]
                                           - means["uni s"]) / 2)


def test_pairing_by_image_removes_the_images_shared_difficulty():
    # Two cells that fail on the same hard images: pairing by image makes the difference's
    # spread far smaller than each cell's own spread over images.
    rng = np.random.default_rng(2)
    hard = rng.random(2000) < 0.1
    a = np.tile(~hard, (5, 1))
    b = a.copy()
    b[:, np.flatnonzero(~hard)[:20]] = False  # b misses 20 more images
    point, values = bootstrap.resampled_contrasts({"a": a, "b": b}, {"d": {"a": 1, "b": -1},
                                                                     "a": {"a": 1}}, 400)
    assert point["d"] == pytest.approx(20 / 2000)
    assert values["d"].std() < values["a"].std() / 2


def test_holm_levels_make_every_verdict_agree_with_its_interval():
    rng = np.random.default_rng(3)
    for trial in range(30):
        family = {f"c{i}": rng.normal(rng.normal(0, 2), 1, 2000) for i in range(6)}
        point = {name: float(v.mean()) for name, v in family.items()}
        found = bootstrap.holm_family(point, family)
        assert [c.name for c in found] == list(family)
        assert all(c.agrees for c in found)
        ranked = sorted(found, key=lambda c: c.rank)
        rejected = [c.rejected for c in ranked]
        assert rejected == sorted(rejected, reverse=True)  # a step-down: a prefix of ranks
        for c in ranked:
            if c.rejected:
                assert c.level == pytest.approx(1 - 0.05 / (6 - c.rank + 1))
                assert c.p <= 0.05 / (6 - c.rank + 1)


def test_a_comparison_without_data_counts_as_p_1_and_keeps_its_place():
    values = {"a": np.full(999, 0.01), "b": None}
    found = bootstrap.holm_family({"a": 0.01, "b": np.nan}, values)
    assert found[0].p == pytest.approx(2 / 1000) and found[0].rejected
    assert found[0].level == pytest.approx(1 - 0.05 / 2)  # m = 2 counts the missing one
    assert found[1].p == 1.0 and not found[1].rejected
    assert bootstrap.verdict(found[0], ("bi better", "uni better")) == "bi better"
    assert bootstrap.verdict(found[1], ("bi better", "uni better")) == "cannot tell"
