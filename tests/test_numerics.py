"""Pinned numerics (birnn.numerics): a training gives the same bytes whatever CPU the
environment imitates, in a single stage and in a joblib sweep job; a process whose numpy was
loaded unpinned refuses to train, in one line; the runs record their numerics; numerics=native
runs the CPU's own kernels and says so.

"Another CPU" is imitated by the environment a user could have there: OpenBLAS's Sandybridge
kernels (no FMA) and numpy without its AVX2 and AVX-512 dispatch targets. Unpinned, a 3-epoch
training already writes another history under it (checked here, so the test can fail).
"""

from __future__ import annotations

import sys

import pytest

from birnn import numerics
from pipeline_testkit import OTHER_CPU, error_lines, run, run_sweep, stage, sweep_store

QUICK = ("experiment=quick", "model=uni", "register_model=false")

pytestmark = pytest.mark.skipif(numerics.unpinnable_reason() is not None,
                                reason=f"the pin cannot run here: {numerics.unpinnable_reason()}")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, prepared_dir) -> dict:
    return sweep_store(tmp_path_factory.mktemp("numerics"), prepared_dir)


def train(workspace: dict, name: str, *overrides: str, **env: str) -> dict[str, bytes]:
    """A quick training into its own metrics folder: {file name: bytes}."""
    out = workspace["tmp"] / name
    result = stage("train", *QUICK, *workspace["paths"], f"name={name}",
                   f"paths.models_dir={out / 'models'}", f"paths.metrics_dir={out}",
                   f"hydra.run.dir={out / 'hydra'}", *overrides, **env)
    assert result.returncode == 0, result.stderr
    return {"history": (out / f"history_{name}.csv").read_bytes(),
            "train": (out / f"train_{name}.json").read_bytes()}


@pytest.fixture(scope="module")
def plain(workspace) -> dict[str, bytes]:
    return train(workspace, "plain")


def run_tags(workspace: dict, run_name: str) -> dict[str, str]:
    client = workspace["client"]
    experiments = [e.experiment_id for e in client.search_experiments()]
    (found,) = client.search_runs(experiments, f"attributes.run_name = '{run_name}'")
    return found.data.tags


def test_a_stage_under_another_cpus_environment_writes_the_same_bytes(workspace, plain):
    assert train(workspace, "other", **OTHER_CPU) == plain
    tags = run_tags(workspace, "other-mnist-seed0")
    assert tags["numerics"] == "pinned"
    assert tags["numerics.blas"].endswith(numerics.BLAS_KERNEL)
    assert "X86_V4" not in tags["numerics.numpy_dispatch"]
    assert tags["numerics.cpu"] == numerics.cpu_model()


def test_native_numerics_under_another_cpus_environment_differ_and_say_so(workspace, plain):
    # What today's code did everywhere: the environment picks the kernels.
    native = train(workspace, "native", "numerics=native", **OTHER_CPU)
    assert native["history"] != plain["history"]
    tags = run_tags(workspace, "native-mnist-seed0")
    assert tags["numerics"] == "native"
    assert tags["numerics.blas"].endswith("Sandybridge")
    assert "X86_V3" not in tags["numerics.numpy_dispatch"]


def test_a_joblib_sweep_job_under_another_cpus_environment_writes_the_same_bytes(
        workspace, plain):
    sweep_dir = workspace["tmp"] / "sweep"
    result, _, _ = run_sweep(workspace, sweep_dir, *QUICK, "hydra.launcher.n_jobs=1",
                             "train.seed=0", **OTHER_CPU)
    assert result.returncode == 0, result.stderr
    (history,) = sweep_dir.glob("*/metrics/history_uni.csv")
    assert history.read_bytes() == plain["history"]


def test_numpy_loaded_unpinned_refuses_to_train(workspace):
    # As a script that imports numpy before the pipeline would: nothing is trained.
    out = workspace["tmp"] / "refused"
    code = ("import numpy, runpy, sys; sys.argv = sys.argv[1:]; "
            "runpy.run_module('pipeline.stages.train', run_name='__main__')")
    result = run([sys.executable, "-c", code, "train", *QUICK, *workspace["paths"],
                  "name=refused", f"paths.models_dir={out / 'models'}",
                  f"paths.metrics_dir={out}", f"hydra.run.dir={out / 'hydra'}"], **OTHER_CPU)
    assert result.returncode == 1
    (line,) = error_lines(result)
    assert line.startswith("error: numpy was loaded before birnn could pin its numerics")
    assert "BIRNN_NUMERICS=native" in line
    assert not (out / "train_refused.json").exists()


def test_numerics_is_checked_in_one_line(workspace):
    result = stage("train", *QUICK, *workspace["paths"], "numerics=fast")
    assert error_lines(result) == ["error: config error: numerics: must be one of pinned, "
                                   "native (unset, it is $BIRNN_NUMERICS's), got 'fast'"]
    result = stage("train", "-m", *QUICK, *workspace["paths"], "numerics=pinned,native")
    assert result.returncode == 1
    assert error_lines(result) == ["error: config error: numerics: cannot be swept; a sweep "
                                   "runs one mode "
                                   "(numerics=pinned or numerics=native)"]
    result = stage("train", *QUICK, *workspace["paths"], BIRNN_NUMERICS="fast")
    assert error_lines(result) == ["error: config error: numerics: must be one of pinned, "
                                   "native (unset, it is $BIRNN_NUMERICS's), got 'fast'"]


def test_a_config_cannot_switch_a_process_that_has_loaded_numpy():
    # numerics=native set in a config file (not on the command line): refused, one line.
    from omegaconf import OmegaConf

    from pipeline.guard import entrypoint

    with pytest.raises(numerics.NumericsError) as refused:
        entrypoint.check_numerics(OmegaConf.create({"numerics": "native"}))
    assert str(refused.value) == (
        "numerics=native but this process runs pinned numerics, which are chosen before numpy "
        "loads: set BIRNN_NUMERICS=native in the environment (or give numerics=native on the "
        "command line)")


def test_a_native_child_gets_the_outer_environment_back(monkeypatch):
    monkeypatch.setattr(numerics, "_OUTER", {"OPENBLAS_CORETYPE": "Zen",
                                             "NPY_DISABLE_CPU_FEATURES": None,
                                             "NPY_ENABLE_CPU_FEATURES": None})
    env = numerics.environment("native")
    assert env["BIRNN_NUMERICS"] == "native" and env["OPENBLAS_CORETYPE"] == "Zen"
    assert "NPY_DISABLE_CPU_FEATURES" not in env
    assert numerics.environment("pinned")["BIRNN_NUMERICS"] == "pinned"


def test_this_test_process_is_pinned():
    # conftest imports birnn first: what the tests compute, they compute pinned.
    assert numerics.require("pinned").mode == "pinned"


def test_a_cpu_that_cannot_run_the_pin_is_said_and_recorded(monkeypatch, caplog):
    from omegaconf import OmegaConf

    from pipeline.guard import entrypoint

    monkeypatch.setattr(numerics, "unpinnable_reason", lambda: "this x86-64 CPU has no AVX2")
    state = numerics.require("pinned")  # not refused: nothing better can run here
    assert state.mode == "unpinned"
    assert state.tags()["numerics.reason"] == "this x86-64 CPU has no AVX2"
    with caplog.at_level("WARNING"):
        entrypoint.check_numerics(OmegaConf.create({"numerics": "pinned"}))
    (record,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "\n" not in record.getMessage()
    assert record.getMessage().startswith("numerics: not pinned, as this x86-64 CPU has no AVX2")
