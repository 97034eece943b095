"""dvc.yaml's code deps are exactly each stage's import closure less the code that cannot
change an output, so that editing a module reruns the stages whose outputs it can change and no
other."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from import_closure import closure
from pipeline_testkit import ROOT, copy_project, dvc

STAGES = {  # dvc stage (each a foreach or matrix over datasets) -> (entry module, Hydra config)
    "prepare": ("pipeline.stages.prepare", "prepare"),
    "train": ("pipeline.stages.train", "train"),
    "evaluate": ("pipeline.stages.evaluate", "evaluate"),
    "compare": ("pipeline.stages.compare", "compare"),
}
CODE = ("pipeline", "birnn")
# Code that stages run but that cannot change a model, a metric or a report, and so is no
# stage's dep: editing it reruns nothing (dvc.yaml's header says why).
EXEMPT = {
    "pipeline/guard/": "one-line errors, signals, credentials, where a stage may write, "
                       "writers' locks: whether a stage runs, never what it writes",
    "pipeline/tracking/": "MLflow: what a run records; no DVC output comes from the store",
    "pipeline/sweeps/": "a sweep's ids, parent run and job records, in MLflow and sweep "
                        "folders; a DVC stage is a single run",
}


def exempt(path: str) -> bool:
    return path.startswith(tuple(EXEMPT))


def code_deps(listed: list[str], root: Path) -> set[str]:
    """The .py files that dvc.yaml's deps cover (a folder dep covers every file in it)."""
    covered = set()
    for dep in listed:
        if dep.split("/")[0] not in CODE:
            continue
        path = root / dep
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        covered.update(f.relative_to(root).as_posix() for f in files)
    return covered


def stage_deps(definition: dict) -> list[str]:
    """The deps of a stage definition: a plain or matrix stage's own, a foreach stage's `do`."""
    return definition.get("do", definition)["deps"]


@pytest.mark.parametrize("name", STAGES)
def test_stage_code_deps_are_its_import_closure(name):
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    module, config = STAGES[name]
    needed = {path for path in closure(ROOT, module, ROOT / "conf" / f"{config}.yaml")
              if not exempt(path)}
    listed = code_deps(stage_deps(stages[name]), ROOT)
    assert not listed - needed, f"{name} lists modules it does not import: {sorted(listed - needed)}"
    assert not needed - listed, f"{name} misses modules it imports: {sorted(needed - listed)}"


def test_every_stage_is_checked():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(STAGES)


def test_the_closure_follows_imports_and_hydra_targets():
    train = closure(ROOT, "pipeline.stages.train", ROOT / "conf" / "train.yaml")
    assert "pipeline/sweeps/callback.py" in train  # only named in conf/train.yaml (exempt)
    assert "pipeline/guard/entrypoint.py" in train and "birnn/numerics.py" in train  # only named in conf/train.yaml
    assert "pipeline/tracking/__init__.py" in train  # a package runs its __init__
    assert "pipeline/reports/figures.py" not in train
    assert "pipeline/sweeps/report.py" not in train


def changed_deps(project: Path) -> dict[str, set[str]]:
    """Stage (train@mnist-uni, ...) -> the deps `dvc status` reports as changed against
    dvc.lock."""
    status = json.loads(dvc(project, "status", "--json"))
    return {stage: {dep for entry in entries if isinstance(entry, dict)
                    for dep in entry.get("changed deps", {})}
            for stage, entries in status.items()}


@pytest.mark.parametrize("edited, rerun", [
    ("pipeline/reports/figures.py", {"evaluate", "compare"}),
    ("pipeline/sweeps/page.py", set()),
    ("pipeline/sweeps/statistics.py", set()),
])
def test_editing_report_or_sweep_code_reruns_only_its_stages(tmp_path, edited, rerun):
    project = copy_project(tmp_path / "project")
    before = changed_deps(project)  # a fresh copy has no data/prepared or models yet
    with open(project / edited, "a", encoding="utf-8") as handle:
        handle.write("\n# edited\n")
    after = changed_deps(project)
    newly = {stage for stage in after if edited in after[stage] - before.get(stage, set())}
    assert {stage.split("@")[0] for stage in newly} == rerun
    if rerun:  # for every dataset
        assert {stage.split("@")[1] for stage in newly} == {"mnist", "fashion_mnist"}


def test_editing_code_that_cannot_change_an_output_reruns_nothing(tmp_path):
    project = copy_project(tmp_path / "project")
    before = changed_deps(project)
    edited = sorted(path for folder in EXEMPT for path in (project / folder).rglob("*.py"))
    assert len(edited) > 10
    for path in edited:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write("\n# reworded\n")
    after = changed_deps(project)
    assert {stage for stage in after if after[stage] - before.get(stage, set())} == set()


@pytest.mark.parametrize("edited", ["birnn/training.py", "pipeline/stages/train.py",
                                    "birnn/numerics.py"])
def test_editing_model_or_training_code_still_retrains(tmp_path, edited):
    project = copy_project(tmp_path / "project")
    before = changed_deps(project)
    with open(project / edited, "a", encoding="utf-8") as handle:
        handle.write("\n# edited\n")
    after = changed_deps(project)
    newly = {stage.split("@")[0] for stage in after if after[stage] - before.get(stage, set())}
    assert "train" in newly  # (birnn/ is one dep: its folder)


def test_no_dep_file_is_empty():
    # DVC warns "'<file>' is empty" for each empty dep of each stage (24 lines a run, for an
    # empty pipeline/__init__.py): a package's __init__ holds at least its docstring.
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    listed = {dep.split("$")[0].rstrip("/") for name in stages for dep in stage_deps(stages[name])}
    paths = {file for dep in listed
             for file in ((ROOT / dep).rglob("*") if (ROOT / dep).is_dir() else [ROOT / dep])
             if file.is_file()}
    assert len(paths) > 40
    empty = sorted(str(p.relative_to(ROOT)) for p in paths if p.stat().st_size == 0)
    assert not empty, f"empty dvc.yaml deps: {empty}"
