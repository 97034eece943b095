"""Accuracy against parameter count: summaries per size, bi minus uni at equal parameter count
(interpolated in log parameters), and the sentence that answers the question."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from study import capacity


def jobs(rows):
    """rows: (kind, hidden, param_count, [accuracies over seeds])."""
    table = []
    for kind, hidden, params, accuracies in rows:
        for seed, acc in enumerate(accuracies):
            table.append({"kind": kind, "merge": "sum" if kind == "bi" else "", "hidden": hidden,
                          "param_count": params, "seed": seed, "status": "FINISHED",
                          "test_acc_best": acc})
    table.append({**table[0], "status": "FAILED", "test_acc_best": 0.0})  # left out
    return pd.DataFrame(table)


UNI = [("uni", 16, 890, [0.90, 0.91, 0.92]), ("uni", 32, 2282, [0.94, 0.95, 0.96])]


def test_sizes_summarise_each_family_and_size():
    sizes = capacity.sizes(jobs([*UNI, ("bi", 20, 2170, [0.95, 0.96, 0.97])]))
    assert list(sizes["family"]) == ["bi (sum)", "uni", "uni"]
    uni32 = sizes[(sizes["family"] == "uni") & (sizes["hidden"] == 32)].iloc[0]
    assert uni32["seeds"] == 3 and uni32["mean"] == pytest.approx(0.95)
    assert uni32["std"] == pytest.approx(0.01) and (uni32["min"], uni32["max"]) == (0.94, 0.96)


def test_uni_is_interpolated_in_log_parameters_at_bis_size():
    diffs = capacity.equal_size_differences(
        jobs([*UNI, ("bi", 20, 2170, [0.95, 0.96, 0.97]), ("bi", 4, 314, [0.8, 0.8, 0.8])]))
    assert list(diffs["param_count"]) == [2170]  # 314 lies outside uni's range: not compared
    row = diffs.iloc[0]
    weight = (math.log(2170) - math.log(890)) / (math.log(2282) - math.log(890))
    uni_at = 0.91 + weight * (0.95 - 0.91)
    assert row["uni_at_same_count"] == pytest.approx(uni_at)
    assert row["difference"] == pytest.approx(0.96 - uni_at)
    assert row["low"] < row["difference"] < row["high"]


def test_the_answer_names_the_better_family_only_when_the_intervals_say_so():
    clear = capacity.equal_size_differences(jobs([*UNI, ("bi", 20, 2170, [0.99, 0.99, 0.99])]))
    assert "bi is better than uni at every size compared" in capacity.answer(clear)
    noisy = capacity.equal_size_differences(
        jobs([("uni", 16, 890, [0.80, 0.95, 0.99]), ("uni", 32, 2282, [0.80, 0.95, 0.99]),
              ("bi", 20, 2170, [0.81, 0.96, 0.98])]))
    assert "cannot be told apart" in capacity.answer(noisy)
    assert "cannot compare" in capacity.answer(pd.DataFrame())
