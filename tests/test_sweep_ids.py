"""Sweep ids: every id accepted round-trips through the printed report command (pasted into a
shell, read by Hydra), ids that are paths are refused, and two sweep folders that give one id
cannot both be used."""

from __future__ import annotations

import shlex

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from mlflow.tracking import MlflowClient

from pipeline.guard.errors import StageError
from pipeline import schema  # noqa: F401  (registers the config schemas)
from pipeline.paths import CONF_DIR
from pipeline.sweeps import job as sweep
from pipeline.sweeps import report


@pytest.fixture
def pasted():
    """The ids that `python -m pipeline.commands.sweep_report` receives from a pasted command."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        def read(command: str) -> list[str]:
            argv = shlex.split(command)  # as a POSIX shell splits it
            assert argv[:3] == ["python", "-m", "pipeline.commands.sweep_report"], argv
            return report.requested_ids(compose("sweep_report", overrides=argv[3:]).sweep)
        yield read
    GlobalHydra.instance().clear()


SWEEP_DIRS = ["multirun/seeds", "multirun/2026-11-28/12-34-56", "multirun/007", "multirun/1e3",
              "multirun/true", "multirun/null", "multirun/nan", "multirun/-1", "multirun/1_000",
              "multirun/v1.2", "sweeps/lr", "/tmp/pytest-of-root/pytest-3/sweeps0/seeds"]


@pytest.mark.parametrize("sweep_dir", SWEEP_DIRS)
def test_every_accepted_sweep_id_round_trips_through_the_printed_command(pasted, sweep_dir):
    identifier = sweep.sweep_id(sweep_dir)
    assert pasted(sweep.report_command([identifier])) == [identifier]
    assert pasted(sweep.report_command(["seeds", identifier])) == ["seeds", identifier]
    assert report.command([identifier]) == sweep.report_command([identifier])


@pytest.mark.parametrize("sweep_dir, problem", [
    ("multirun/../data", "contains '..'"),
    ("multirun/it's", "has characters other than"),
    ("multirun/a b", "has characters other than"),
    ("multirun/a,b", "has characters other than"),  # a Hydra sweep of two values
    ("multirun/.hidden", "has characters other than"),
    ("multirun/$HOME", "has characters other than"),
])
def test_a_sweep_dir_that_gives_no_plain_id_is_refused(sweep_dir, problem):
    with pytest.raises(StageError) as info:
        sweep.sweep_id(sweep_dir)
    assert str(info.value).startswith(f"hydra.sweep.dir: {sweep_dir!r}") and problem in str(
        info.value)


@pytest.mark.parametrize("value, problem", [
    ("../../data", "contains '..'"), ("a/b", "contains a path separator"),
    ("a\\b", "contains a path separator"), ("a..b", "contains '..'"), ("", "is empty"),
    ("it's", "has characters other than"), ("a+b", "has characters other than"),
    (7, "Hydra read 7 as int"), (True, "Hydra read True as bool"),
])
def test_a_requested_id_that_is_not_a_plain_name_is_refused_in_one_line(value, problem):
    with pytest.raises(StageError) as info:
        sweep.check_id(value)
    assert str(info.value).startswith("sweep: ") and problem in str(info.value)
    assert "\n" not in str(info.value)


def test_two_sweep_folders_that_give_one_id_cannot_both_be_used(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("sweeps", artifact_location=tmp_path.as_uri())
    first, second = tmp_path / "multirun" / "a_b", tmp_path / "multirun" / "a" / "b"
    assert sweep.sweep_id(str(first)) == sweep.sweep_id(str(second))
    identifier = sweep.sweep_id(str(first))
    sweep.check_new_sweep(client, identifier, str(first))  # a new id: fine
    run = client.create_run(experiment, tags={sweep.SWEEP_TAG: identifier,
                                              sweep.ROLE_TAG: "parent",
                                              "sweep_dir": str(first.resolve())})

    with pytest.raises(StageError) as info:
        sweep.check_new_sweep(client, identifier, str(second))
    assert str(info.value) == (
        f"hydra.sweep.dir: {str(second)!r} gives the sweep id {identifier!r}, already taken "
        f"by the sweep in {first} (parent run {run.info.run_id}): choose another "
        "hydra.sweep.dir")
    with pytest.raises(StageError, match=f"^sweep {identifier!r} already exists"):
        sweep.check_new_sweep(client, identifier, str(first))  # the same folder again
