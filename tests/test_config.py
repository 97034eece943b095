"""The configuration: composition of the groups and presets, and the typed schema's checks.

Composed with Hydra's compose API (GlobalHydra cleared around each test); the one-line error
of the real entry point is checked in a subprocess.
"""

from __future__ import annotations

import re
import shlex

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from pipeline import schema
from pipeline.guard.errors import ConfigError, one_line
from pipeline.paths import CONF_DIR
from pipeline_testkit import ROOT, error_lines, stage

STAGES = ("prepare", "train", "evaluate", "compare", "sweep_report")


@pytest.fixture
def compose_cfg():
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        yield lambda name, *overrides: compose(name, overrides=list(overrides))
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("name", STAGES)
def test_every_stage_config_composes_and_validates(compose_cfg, name):
    cfg = compose_cfg(name)
    assert schema.validate(cfg) is cfg
    if "dataset" in cfg:  # the pipeline's stages: outputs per dataset (sweep reports: none)
        assert cfg.paths.prepared_dir == "data/prepared/mnist"
        assert cfg.dataset == "mnist"


def test_book_preset_is_the_default_and_has_the_books_settings(compose_cfg):
    uni = compose_cfg("train")
    assert uni.model.kind == "uni" and uni.name == "uni"
    assert (uni.model.hidden_size, uni.model.lr, dict(uni.model.lr_milestones)) == (32, 0.005, {})
    assert OmegaConf.to_container(uni.train) == {
        "epochs": 100, "batch_size": 128, "checkpoint_every": 0.5, "seed": 0,
        "dtype": "float64", "train_limit": None, "val_limit": None}
    bi = compose_cfg("train", "model=bi")
    assert (bi.model.hidden_fwd, bi.model.hidden_bwd, bi.model.merge) == (20, 20, "sum")
    assert bi.model.lr == 0.01
    assert dict(bi.model.lr_milestones) == {30: 0.008, 50: 0.005, 70: 0.002}
    assert bi.name == "bi"
    assert compose_cfg("train", "experiment=book") == uni  # book changes nothing


def test_book_split_is_55000_5000(compose_cfg):
    data = compose_cfg("prepare").data
    assert round(60000 * data.val_fraction) == 5000
    assert data.manifest == "data/raw/mnist/SHA256SUMS"


def test_quick_preset_shrinks_training_only(compose_cfg):
    book, quick = compose_cfg("train", "model=bi"), compose_cfg("train", "model=bi", "experiment=quick")
    assert quick.train.epochs < book.train.epochs
    assert quick.train.val_limit is not None
    assert quick.model == book.model  # same network and learning-rate schedule
    assert quick.train.batch_size == book.train.batch_size


@pytest.mark.parametrize("name, overrides, key", [
    ("train", ["model.lr=-0.01"], "model.lr"),
    ("train", ["model=bi", "model.lr_milestones={30:0}"], "model.lr_milestones.30"),
    ("train", ["model=bi", "model.merge=average"], "model.merge"),
    ("train", ["model=bi", "model.hidden_bwd=10"], "model.hidden_bwd"),
    ("train", ["model.hidden_size=0"], "model.hidden_size"),
    ("train", ["train.epochs=0"], "train.epochs"),
    ("train", ["train.batch_size=-1"], "train.batch_size"),
    ("train", ["train.checkpoint_every=0"], "train.checkpoint_every"),
    ("train", ["train.checkpoint_every=101"], "train.checkpoint_every"),
    ("train", ["train.dtype=float16"], "train.dtype"),
    ("train", ["train.train_limit=0"], "train.train_limit"),
    ("prepare", ["data.val_fraction=1.0"], "data.val_fraction"),
    ("prepare", ["data.val_fraction=-0.1"], "data.val_fraction"),
    ("prepare", ["data.val_fraction=0"], "data.val_fraction"),  # no validation: no best
    ("evaluate", ["models=[]"], "models"),
    ("compare", ["tracking.probe_timeout_seconds=0"], "tracking.probe_timeout_seconds"),
    ("train", ["model.lr=inf"], "model.lr"),  # passes '> 0', then every loss is nan
    ("train", ["model.lr=nan"], "model.lr"),
    ("train", ["model=bi", "model.lr_milestones={30:inf}"], "model.lr_milestones.30"),
    ("compare", ["tracking.flush_every_seconds=inf"], "tracking.flush_every_seconds"),
    ("train", ["name=.."], "name"),  # models/<name>/ is replaced whole: never a path
    ("train", ["name=a/b"], "name"),
    ("train", ["name=''"], "name"),
    ("evaluate", ["models=[uni,..]"], "models"),
    ("train", ["dataset=../data"], "dataset"),  # data/prepared/<dataset>/, models/<dataset>/
    ("compare", ["dataset="], "dataset"),
    ("prepare", ["data=fashion_mnist", "dataset=mnist"], "dataset"),  # must name its data
    ("sweep_report", ["sweep=../../data"], "sweep"),  # reports/sweeps/<id>/
    ("sweep_report", ["sweep=[a,.hidden]"], "sweep"),
])
def test_impossible_value_fails_naming_the_key(compose_cfg, name, overrides, key):
    cfg = compose_cfg(name, *overrides)
    with pytest.raises(ConfigError) as info:
        schema.validate(cfg)
    message = str(info.value)
    assert message.startswith(f"{key}: ") and "\n" not in message


def test_concat_merge_allows_unequal_sizes(compose_cfg):
    schema.validate(compose_cfg("train", "model=bi", "model.merge=concat", "model.hidden_bwd=10"))


@pytest.mark.parametrize("name, overrides, key", [
    ("train", ["learning_rate=0.1"], "learning_rate"),                # unknown top-level key
    ("train", ["model.hiden_size=8"], "model.hiden_size"),             # typo
    ("train", ["model=bi", "model.hidden_size=8"], "model.hidden_size"),  # uni's key on bi
    ("train", ["train.epochs=ten"], "train.epochs"),                   # wrong type
    ("train", ["model.lr=fast"], "model.lr"),
    ("prepare", ["data.split_seed=0.5"], "data.split_seed"),
    ("train", ["model=bi", "model.lr_milestones.thirty=0.1"], "model.lr_milestones.thirty"),
])
def test_unknown_key_or_wrong_type_fails_at_composition(compose_cfg, name, overrides, key):
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg(name, *overrides)
    message = one_line(info.value)
    assert message.startswith(f"config error: {key}: "), message


@pytest.mark.parametrize("override, key", [
    ("+model.hiden_size=8", "model.hiden_size"),
    ("+learning_rate=0.1", "learning_rate"),
    ("+train.epoch=3", "train.epoch"),
    ("+tracking.password=x", "tracking.password"),
])
def test_a_key_added_with_plus_is_rejected_like_any_unknown_key(compose_cfg, override, key):
    cfg = compose_cfg("train", override)  # '+' gets past struct mode at composition
    with pytest.raises(ConfigError) as info:
        schema.validate(cfg)
    assert one_line(info.value).startswith(f"config error: {key}: no such key in the schema")


def test_a_learning_rate_milestone_can_be_added_to_either_model(compose_cfg):
    uni = compose_cfg("train", "model.lr_milestones={1:0.1}")
    assert dict(schema.validate(uni).model.lr_milestones) == {1: 0.1}
    bi = compose_cfg("train", "model=bi", "model.lr_milestones={1:0.1}")  # merged in
    assert dict(bi.model.lr_milestones) == {30: 0.008, 50: 0.005, 70: 0.002, 1: 0.1}
    with pytest.raises(ConfigCompositionException):  # epochs stay integers
        compose_cfg("train", "model.lr_milestones={ten:0.1}")


def test_unknown_group_option_is_named(compose_cfg):
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg("train", "model=lstm")
    message = one_line(info.value)
    assert "model/lstm" in message and "bi" in message and "uni" in message
    assert "\n" not in message


@pytest.mark.parametrize("overrides, start", [
    (["train.epochs=0"], "error: config error: train.epochs: must be >= 1, got 0"),
    (["model.hiden_size=8"], "error: config error: model.hiden_size: "),
    (["+model.hiden_size=8"], "error: config error: model.hiden_size: no such key"),
    (["model.lr=inf"], "error: config error: model.lr: must be a finite number > 0, got inf"),
    (["data=fashion_mnist"], "error: config error: data=fashion_mnist: this stage takes the "
                             "dataset as dataset=fashion_mnist (data= is the prepare stage's)"),
    (["tracking=server"], "error: config error: tracking.uri: tracking=server needs the "
                          "server's address: export MLFLOW_TRACKING_URI=http://<host>:<port>"),
])
def test_entry_point_reports_bad_config_in_one_line(overrides, start):
    result = stage("train", *overrides, timeout=60)
    assert result.returncode == 1
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith(start), result.stderr


@pytest.mark.parametrize("name", STAGES)
def test_help_lists_the_groups_a_user_sets_and_their_options(name):
    result = stage("commands.sweep_report" if name == "sweep_report" else name, "--help",
                   timeout=60)
    assert result.returncode == 0, result.stderr
    listed = result.stdout.split("== Groups ==\n")[1].split("\n\n")[0].splitlines()
    groups = {line.split(":")[0]: line.split(": ")[1].split(" (")[0].split(", ")
              for line in listed if not line.startswith("The dataset")}
    # exactly the groups in the stage's defaults list (not the schema, not another stage's)
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        choices = compose(name, return_hydra_config=True).hydra.runtime.choices
    GlobalHydra.instance().clear()
    assert set(groups) == {g for g in choices if not g.startswith("hydra/")}
    for group, options in groups.items():
        assert options == sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")), group
    assert "schema" not in result.stdout.split("== Config")[0]


def hand_run_trainings() -> list[tuple[str, list[str]]]:
    """The single-run train commands of README.md and docs/*.md: (page, overrides)."""
    found = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for match in re.finditer(r"python -m pipeline\.stages\.train([^`\n#]*)", page.read_text()):
            text = match.group(1).strip()
            if text.endswith("\\") or " -m " in f" {text} " or "..." in text or not text:
                continue  # a sweep (its jobs write under their sweep folder), or elided
            words = shlex.split(text.replace("<server>", "server"))  # (placeholder)
            found.append((page.name, words))
    return found


def test_the_docs_hand_run_trainings_write_to_their_own_places(compose_cfg):
    # A hand-run example that left name unset would replace the DVC pipeline's own model
    # (models/<dataset>/<kind>/), its metrics and its registered version.
    examples = hand_run_trainings()
    assert len(examples) >= 5, examples
    for page, overrides in examples:
        cfg = compose_cfg("train", *overrides)
        assert cfg.name != cfg.model.kind, f"{page}: {' '.join(overrides)} writes the pipeline's own model"
