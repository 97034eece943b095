"""make exp-show's table, from data shaped as dvc exp show --json gives it: a preset's settings
win over the train defaults it overrides, settings equal in every row go below the table, the
table fits 120 columns, and each experiment shows its state, with test results only if it
succeeded (tests/data/exp_show_failed_queued.json is a real failed queued experiment's). (tests/test_launchers.py runs it over real queued experiments.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.commands import exp_show


def _data(preset: str, *, seed: int = 0, merge: str = "sum", uni: float = 0.9421,
          bi: float = 0.9579, fashion: bool = True) -> dict:
    params = {
        "params.yaml": {"data": {"experiment": preset, "datasets": ["mnist"]}},
        "conf/train/default.yaml": {"data": {"epochs": 100, "seed": seed}},
        "conf/model/uni.yaml": {"data": {"hidden_size": 32, "lr": 0.005}},
        "conf/model/bi.yaml": {"data": {"hidden_fwd": 20, "merge": merge, "lr": 0.01}},
    }
    if preset == "quick":
        params["conf/experiment/quick.yaml"] = {"data": {"train": {"epochs": 3}}}
    metrics = {"metrics/mnist/test.json": {"data": {"uni": {"best": {"accuracy": uni}},
                                                    "bi": {"best": {"accuracy": bi}}}},
               "metrics/mnist/train_uni.json": {"data": {"best_epoch": 97}}}
    if fashion:
        metrics["metrics/fashion_mnist/test.json"] = {
            "data": {"uni": {"best": {"accuracy": 0.8161}}, "bi": {"best": {"accuracy": 0.8455}}}}
    return {"params": params, "metrics": metrics}


def _shown(*experiments: tuple[str, dict]) -> list[dict]:
    return [{"rev": "workspace", "name": None, "data": _data("book")},
            {"rev": "080cab6df25a0000", "name": "main", "data": _data("book"),
             "experiments": [{"revs": [{"rev": "8a27b44747cf", "name": name, "data": data}]}
                             for name, data in experiments]}]


def test_a_quick_experiment_shows_the_epochs_it_trained():
    frame = exp_show.table(_shown(("holey-aura", _data("quick", uni=0.5344, bi=0.6559,
                                                         fashion=False))))
    assert list(frame["experiment"]) == ["workspace", "main", "└ holey-aura"]
    assert list(frame["preset"]) == ["book", "book", "quick"]
    assert list(frame["epochs"]) == ["100", "100", "3"]
    assert list(frame["uni\nmnist"]) == ["94.21%", "94.21%", "53.44%"]
    assert list(frame["bi\nfmnist"]) == ["84.55%", "84.55%", "-"]


def test_settings_equal_everywhere_go_below_the_table():
    page = exp_show.render(exp_show.table(_shown(("a", _data("book", seed=1)),
                                                 ("b", _data("book", seed=2, merge="concat")))))
    header = " ".join(page.splitlines()[:2]).split()
    assert "seed" in header and "merge" in header  # they vary
    assert "units" not in header
    assert "all rows: uni units 32, uni lr 0.005, bi units 20, bi lr 0.01" in page


def test_the_table_fits_120_columns_when_every_setting_varies():
    varied = _data("quick", seed=12, merge="concat")
    varied["params"]["conf/model/uni.yaml"]["data"] = {"hidden_size": 48, "lr": 0.0125}
    varied["params"]["conf/model/bi.yaml"]["data"].update(hidden_fwd=32, lr=0.0175)
    page = exp_show.render(exp_show.table(_shown(("stoic-hyperdrive", varied))))
    assert "all rows" not in page
    assert max(len(line) for line in page.splitlines()[:-1]) <= 120, page


def test_a_missing_dvc_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert exp_show.main([]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: dvc: command not found")


FAILED_QUEUED = Path(__file__).parent / "data" / "exp_show_failed_queued.json"


def test_a_failed_experiment_shows_as_failed_without_its_baselines_numbers():
    # dvc exp show --json (DVC 3.67) after `dvc exp run --queue -S conf/model/bi.yaml:lr=0.02`
    # failed at evaluate@mnist (the unchanged uni's run.json was not in the queue's copy):
    # DVC gives the failed experiment its baseline's metrics and the executor state "failed".
    shown = json.loads(FAILED_QUEUED.read_text())
    [experiment] = shown[1]["experiments"]
    assert experiment["executor"]["state"] == "failed"
    assert experiment["revs"][0]["data"]["metrics"] == shown[1]["data"]["metrics"]

    frame = exp_show.table(shown)

    assert list(frame["experiment"]) == ["workspace", "master", "└ bluer-scup"]
    assert list(frame["state"]) == ["", "", "failed"]
    assert list(frame["uni\nmnist"]) == ["53.44%", "53.44%", "-"]
    assert list(frame["bi\nmnist"])[2] == "-"
    page = exp_show.render(frame)
    [row] = [line for line in page.splitlines() if line.startswith("└ bluer-scup")]
    assert "%" not in row and " failed " in row and "0.02" in row


@pytest.mark.parametrize("executor, error, expected", [
    ({"state": "queued", "name": "dvc-task"}, None, "queued"),
    ({"state": "running", "name": "dvc-task"}, None, "running"),
    ({"state": "success", "name": "dvc-task"}, None, "success"),
    (None, None, "success"),   # run in the workspace, or pulled: an experiment commit
    ({"state": "running"}, {"msg": "Experiment run failed", "type": ""}, "failed"),
])
def test_each_experiment_shows_its_state_and_only_a_success_its_numbers(executor, error,
                                                                        expected):
    shown = _shown(("x", _data("quick", uni=0.5, bi=0.6)))
    shown[1]["experiments"][0]["executor"] = executor
    shown[1]["experiments"][0]["revs"][0]["error"] = error
    frame = exp_show.table(shown)
    assert frame["state"].iloc[2] == expected
    assert frame["uni\nmnist"].iloc[2] == ("50.00%" if expected == "success" else "-")


def test_every_line_fits_120_columns_with_a_failed_experiment():
    page = exp_show.render(exp_show.table(json.loads(FAILED_QUEUED.read_text())))
    assert max(len(line) for line in page.splitlines()) <= 120, page
