"""Outputs do not depend on where the checkout is: prepared data made in another folder of
another copy is byte-identical and has the hash committed in dvc.lock, and no output holds the
checkout's absolute path (a DVC-cached file that did would differ in every clone)."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from pipeline import paths, schema
from pipeline.guard import output_paths
from pipeline.stages import train as train_stage
from pipeline_testkit import ROOT, TINY, copy_project, dvc


def locked_md5(project, out: str) -> str:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    for stage in lock["stages"].values():
        for entry in stage.get("outs", []):
            if entry["path"] == out:
                return entry["md5"]
    raise AssertionError(f"{out} is not in {project / 'dvc.lock'}")


def test_prepare_in_a_fresh_copy_elsewhere_reproduces_the_committed_hash(prepared_dir,
                                                                         tmp_path):
    project = copy_project(tmp_path / "somewhere" / "else" / "birnn")
    dvc(project, "repro", "prepare@mnist")

    assert locked_md5(project, "data/prepared/mnist") == locked_md5(ROOT, "data/prepared/mnist")
    made_here, made_there = prepared_dir, project / "data" / "prepared" / "mnist"  # elsewhere
    names = sorted(p.name for p in made_here.iterdir())
    assert names == sorted(p.name for p in made_there.iterdir())
    for name in names:
        assert (made_here / name).read_bytes() == (made_there / name).read_bytes(), name
    assert "changed outs" not in dvc(project, "status", "prepare@mnist")


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """The project as if it were checked out at tmp_path/checkout: relative paths, the
    default store and the output areas all resolve there."""
    root = tmp_path / "checkout"
    for manifest in ROOT.glob("data/raw/*/SHA256SUMS"):  # (prepared data is checked against them)
        copy = root / manifest.relative_to(ROOT)
        copy.parent.mkdir(parents=True)
        shutil.copy2(manifest, copy)
    monkeypatch.setattr(paths, "PROJECT_ROOT", root)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.setenv(output_paths.ROOTS_ENV, "")
    return root


def test_model_files_hold_no_absolute_path_of_the_checkout(checkout, prepared_dir):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(paths.CONF_DIR)):
        cfg = compose("train", overrides=[*TINY, f"paths.prepared_dir={prepared_dir}"],
                      return_hydra_config=True)
    GlobalHydra.instance().clear()
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]

    train_stage.train_task(schema.validate(cfg))

    written = [p for p in (checkout / "models").rglob("*") if p.is_file()]
    written += [p for p in (checkout / "metrics").rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"config.yaml", "run.json", "train_uni.json"}
    for path in written:
        assert str(checkout).encode() not in path.read_bytes(), path
    run_info = json.loads((checkout / "models" / "mnist" / "uni" / "run.json").read_text())
    assert run_info["tracking_uri"] == "sqlite:///mlflow.db"  # relative to the project root


def test_portable_makes_the_project_root_and_dvc_root_relative(monkeypatch, tmp_path):
    root = tmp_path / "repo"
    monkeypatch.setattr(paths, "PROJECT_ROOT", root / ".dvc" / "tmp" / "exps" / "x1")
    monkeypatch.setenv("DVC_ROOT", str(root))  # a queued experiment's copy
    assert paths.portable(f"sqlite:///{root}/mlflow.db") == "sqlite:///mlflow.db"
    assert paths.portable(f"prepared_dir: {root}/.dvc/tmp/exps/x1/data/prepared\n") == (
        "prepared_dir: data/prepared\n")
    assert paths.portable("prepared_dir: /srv/data/prepared") == "prepared_dir: /srv/data/prepared"
