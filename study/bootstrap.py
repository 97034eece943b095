"""The pre-registered test of study v3 (study/conf/preregistration.yaml, `test` and
`multiplicity`): a two-level percentile bootstrap over seeds and test images, paired by image,
of contrasts of cell means, with Holm's step-down and intervals at the Holm level, so that a
verdict and its interval never disagree.

Not used by the page yet: the next version of study.findings takes its confirmatory verdicts
from here, with each cell's per-image correctness from the sweep reports' predictions.npz
(study.data.load_predictions).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats

RESAMPLES = 10_000
SEED = 25
FAMILYWISE = 0.05
POWER = 0.8


def resampled_contrasts(correct: Mapping[str, np.ndarray],
                        contrasts: Mapping[str, Mapping[str, float]],
                        resamples: int = RESAMPLES, seed: int = SEED,
                        chunk: int = 250) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Each contrast's value (in accuracy, 0-1) and its ``resamples`` bootstrap values.

    ``correct``: per cell (in the pre-registration's cell order), a boolean (runs x images)
    matrix, one row per seed, the same images in the same order for every cell. In each
    resample, from one generator ``default_rng(seed)``: the test images are drawn with
    replacement (one draw shared by all cells: paired by image), then each cell's runs, in
    ``correct``'s order. A cell's value is the mean over its drawn runs of their accuracy on the
    drawn images."""
    cells = list(correct)
    images = {matrix.shape[1] for matrix in correct.values()}
    if len(images) != 1:
        raise ValueError(f"cells tested on different numbers of images: {sorted(images)}")
    (n_images,) = images
    for name, weights in contrasts.items():
        unknown = set(weights) - set(cells)
        if unknown:
            raise ValueError(f"contrast {name}: no cell {min(unknown)!r}")
    matrices = {cell: np.asarray(correct[cell], dtype=np.float64) for cell in cells}
    point_cells = {cell: float(m.mean()) for cell, m in matrices.items()}
    point = {name: sum(w * point_cells[c] for c, w in weights.items())
             for name, weights in contrasts.items()}
    rng = np.random.default_rng(seed)
    values = {name: np.empty(resamples) for name in contrasts}
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        counts = np.empty((n_images, size))
        runs = {cell: np.empty((size, len(matrices[cell])), dtype=np.intp) for cell in cells}
        for b in range(size):  # the draws, in the registered order
            counts[:, b] = np.bincount(rng.integers(0, n_images, n_images), minlength=n_images)
            for cell in cells:
                runs[cell][b] = rng.integers(0, len(matrices[cell]), len(matrices[cell]))
        means = {}
        for cell in cells:
            accuracy = matrices[cell] @ counts / n_images  # runs x resamples
            means[cell] = np.take_along_axis(accuracy, runs[cell].T, axis=0).mean(axis=0)
        for name, weights in contrasts.items():
            values[name][start:start + size] = sum(w * means[c] for c, w in weights.items())
    return point, values


def p_value(resampled: np.ndarray) -> float:
    """Two-sided bootstrap p: min(1, 2 min(1 + #(D* <= 0), 1 + #(D* >= 0)) / (B + 1))."""
    below, above = int((resampled <= 0).sum()), int((resampled >= 0).sum())
    return min(1.0, 2 * min(1 + below, 1 + above) / (len(resampled) + 1))


def percentile_interval(resampled: np.ndarray, alpha: float) -> tuple[float, float]:
    """The r-th smallest and the r-th largest of the B resampled values, r = floor(alpha (B +
    1) / 2) (infinite if r = 0): it excludes 0 exactly when :func:`p_value` <= alpha."""
    r = math.floor(alpha * (len(resampled) + 1) / 2)
    if r == 0:
        return -math.inf, math.inf
    ordered = np.sort(resampled)
    return float(ordered[r - 1]), float(ordered[-r])


@dataclass
class Comparison:
    name: str
    value: float      # the contrast, accuracy (0-1)
    p: float          # bootstrap p, unadjusted
    rank: int         # 1-based, by p (ties by name's order in the family)
    level: float      # the interval's confidence level (1 - the Holm level)
    low: float
    high: float
    rejected: bool    # by Holm's step-down
    detectable: float  # smallest true contrast found with 80% power at the strictest level

    @property
    def sign(self) -> int:
        """+1 if the interval lies above 0, -1 below, 0 if it contains 0."""
        return 1 if self.low > 0 else -1 if self.high < 0 else 0

    @property
    def agrees(self) -> bool:
        return self.rejected == (self.sign != 0)


def holm_family(point: Mapping[str, float], resampled: Mapping[str, np.ndarray | None],
                familywise: float = FAMILYWISE, power: float = POWER) -> list[Comparison]:
    """Holm's step-down over the family (``point``'s order), a comparison without data
    (``resampled`` None) counting as p = 1, and each comparison's percentile interval at
    level 1 - familywise / (m - min(r, r0) + 1): r its rank by p, r0 the first rank not
    rejected (m + 1 if all are)."""
    names = list(point)
    m = len(names)
    ps = {n: 1.0 if resampled.get(n) is None else p_value(resampled[n]) for n in names}
    order = sorted(names, key=lambda n: (ps[n], names.index(n)))
    r0 = m + 1
    for rank, name in enumerate(order, start=1):
        if ps[name] > familywise / (m - rank + 1):
            r0 = rank
            break
    strictest = familywise / m
    factor = stats.norm.ppf(1 - strictest / 2) + stats.norm.ppf(power)
    found = []
    for rank, name in enumerate(order, start=1):
        alpha = familywise / (m - min(rank, r0) + 1)
        values = resampled.get(name)
        if values is None:
            low = high = detectable = math.nan
        else:
            low, high = percentile_interval(values, alpha)
            detectable = factor * float(values.std(ddof=1))
        found.append(Comparison(name, point[name], ps[name], rank, 1 - alpha, float(low),
                                float(high), rank < r0, detectable))
    return sorted(found, key=lambda c: names.index(c.name))


def verdict(comparison: Comparison, words: tuple[str, str]) -> str:
    """The registered rule: ``words[0]`` iff the Holm-level interval lies above 0,
    ``words[1]`` iff below, else 'cannot tell' (also where interval and Holm disagree)."""
    if not comparison.agrees or comparison.sign == 0:
        return "cannot tell"
    return words[0] if comparison.sign > 0 else words[1]
