"""The DVC experiments as one readable table: what each trained with and scored.

    python -m pipeline.commands.exp_show [dvc exp show options, e.g. -A or -n 5]   (make exp-show)

`dvc exp show` lists every tracked param, dep and metric (about 145 columns); this keeps the
ones that tell the experiments apart, under short names, from its --json output, with each
experiment's state (queued, running, success, failed): one that has not succeeded shows no
test accuracy, since its metrics files are still its baseline's.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd

# (column, params file, key): the settings a user varies with dvc exp run -S
# (two-line headers keep the table within 120 columns)
SETTINGS = [("uni\nunits", "conf/model/uni.yaml", "hidden_size"),
            ("uni\nlr", "conf/model/uni.yaml", "lr"),
            ("bi\nunits", "conf/model/bi.yaml", "hidden_fwd"),
            ("bi\nmerge", "conf/model/bi.yaml", "merge"),
            ("bi\nlr", "conf/model/bi.yaml", "lr"),
            ("seed", "conf/train/default.yaml", "seed")]
# keys of conf/train/default.yaml that a preset (conf/experiment/<preset>.yaml) may override
PRESET_KEYS = ("epochs",)
SHORT_DATASET = {"mnist": "mnist", "fashion_mnist": "fmnist"}


def _get(tree: dict | None, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _file(data: dict, kind: str, path: str) -> dict:
    return (data.get(kind) or {}).get(path, {}).get("data") or {}


def _text(value) -> str:
    return "-" if value is None else str(value)


def state(experiment: dict, rev: dict) -> str:
    """An experiment's state from dvc exp show --json: its executor's (queued, running,
    success, failed), "failed" if DVC records an error for it, "success" for an experiment
    without an executor (run in the workspace, or pulled: a finished experiment commit)."""
    if rev.get("error"):
        return "failed"
    executor = experiment.get("executor") or {}
    return str(executor.get("state") or "success")


def row(name: str, data: dict, status: str = "") -> dict[str, str]:
    """One experiment's row, from its ``data`` in dvc exp show --json; ``status``: its state
    (blank for the workspace and baselines). An experiment that has not succeeded shows no
    test results: its files are its baseline's (a queued or failed experiment never wrote
    its own), and showing them would pass them off as its own."""
    preset = _file(data, "params", "params.yaml").get("experiment")
    overrides = _file(data, "params", f"conf/experiment/{preset}.yaml")
    trained = {"experiment": name, "state": status, "preset": _text(preset)}
    for key in PRESET_KEYS:  # what the run trained with: the preset's value wins
        value = _get(overrides, f"train.{key}")
        trained[key] = _text(value if value is not None else
                             _file(data, "params", "conf/train/default.yaml").get(key))
    for column, path, key in SETTINGS:
        trained[column] = _text(_file(data, "params", path).get(key))
    if status not in ("", "success"):
        return trained
    # MNIST first, as in params.yaml
    for path, content in sorted((data.get("metrics") or {}).items(),
                                key=lambda item: "/mnist/" not in item[0]):
        parts = path.split("/")  # metrics/<dataset>/test.json
        if len(parts) != 3 or parts[0] != "metrics" or parts[2] != "test.json":
            continue
        dataset = parts[1]
        for model in ("uni", "bi"):
            accuracy = _get(content.get("data"), f"{model}.best.accuracy")
            if accuracy is not None:
                trained[f"{model}\n{SHORT_DATASET.get(dataset, dataset)}"] = f"{accuracy:.2%}"
    return trained


def table(shown: list[dict]) -> pd.DataFrame:
    """Rows for the workspace, each baseline commit and its experiments (dvc exp show --json)."""
    rows = []
    for baseline in shown:
        rev = baseline["rev"]
        label = baseline.get("name") or (rev if rev == "workspace" else rev[:7])
        if baseline.get("data"):
            rows.append(row(label, baseline["data"]))
        for experiment in baseline.get("experiments") or ():
            for rev in experiment["revs"]:
                name = f"└ {rev.get('name') or experiment.get('name') or rev['rev'][:7]}"
                rows.append(row(name, rev.get("data") or {}, state(experiment, rev)))
    return pd.DataFrame(rows).fillna("-")


def _columns(frame: pd.DataFrame) -> list[str]:
    """Left-aligned columns two spaces apart, each as wide as its longest header line or value."""
    headers = [str(column).split("\n") for column in frame.columns]
    depth = max(len(header) for header in headers)
    headers = [[""] * (depth - len(header)) + header for header in headers]
    widths = [max(*(len(line) for line in header), *(len(value) for value in frame[column]))
              for header, column in zip(headers, frame.columns)]
    rows = [[header[level] for header in headers] for level in range(depth)]
    rows.append(["-" * width for width in widths])
    rows += frame.values.tolist()
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
            for row in rows]


def render(frame: pd.DataFrame) -> str:
    """The table, with settings equal in every row moved to a line below it (to fit 120
    columns)."""
    settings = [column for column, _, _ in SETTINGS if column in frame]
    same = [column for column in settings if frame[column].nunique() == 1]
    lines = _columns(frame.drop(columns=same))
    if same:
        lines.append("all rows: " + ", ".join(f"{column.replace(chr(10), ' ')} "
                                              f"{frame[column].iloc[0]}"
                                              for column in same))
    lines.append("uni/bi <dataset>: test accuracy with the best validation parameters, of "
                 "a success only; every column: dvc exp show")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        result = subprocess.run(["dvc", "exp", "show", "--json", *argv],
                                capture_output=True, text=True)
    except FileNotFoundError:
        print("error: dvc: command not found (make setup, then use make exp-show or "
              ". .venv/bin/activate)", file=sys.stderr)
        return 1
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        print(f"error: dvc exp show: {lines[-1] if lines else 'failed'}", file=sys.stderr)
        return 1
    print(render(table(json.loads(result.stdout))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
