"""Typed schema of the pipeline's configuration, registered in Hydra's ConfigStore, and the
value checks a type cannot express (:func:`validate`). Both fail before any work starts, in one
line naming the full key (docs/architecture.md, "Configuration").
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import MISSING, DictConfig, OmegaConf

import birnn.models
from birnn import numerics
from pipeline.guard.errors import ConfigError

# The library's own lists, so the schema accepts exactly what birnn can build.
MERGE_MODES = birnn.models.MERGES              # formula 5 of chapter 19.7
MODEL_KINDS = tuple(birnn.models.MODEL_KINDS)  # ("uni", "bi")
FLOAT_DTYPES = birnn.models.DTYPES


# ----------------------------------------------------------------------------- groups
@dataclass
class ModelConfig:
    """Fields common to both kinds. ``lr`` is the rate from epoch 0; ``lr_milestones`` maps a
    0-based epoch to the rate used from that epoch on (the book's step schedule).

    Its keys are integers, so override it as a dict, which merges into the configured one:
    ``'model.lr_milestones={30:0.007}'`` (a dotted ``model.lr_milestones.30=...`` arrives as a
    string key and is rejected).

    ``lr_decay_every``, if set, replaces the milestones by a step schedule given as a fraction
    of the run, so that one tuned on short runs means the same on long ones
    (``hparams_search=bi_lr``): the rate is multiplied by ``lr_decay`` every
    ``lr_decay_every`` x ``train.epochs`` epochs (:func:`lr_milestones`).
    """

    kind: str = MISSING
    lr: float = MISSING
    lr_milestones: Dict[int, float] = field(default_factory=dict)
    lr_decay: float = 1.0  # the factor applied at each step of lr_decay_every
    lr_decay_every: Optional[float] = None  # fraction of train.epochs between steps, in (0, 1]


@dataclass
class UniModelConfig(ModelConfig):
    kind: str = "uni"
    hidden_size: int = 32


@dataclass
class BiModelConfig(ModelConfig):
    kind: str = "bi"
    hidden_fwd: int = 20
    hidden_bwd: int = 20
    merge: str = "sum"


@dataclass
class DataConfig:
    """A raw dataset in IDX format and how it is split (the book: 55,000 / 5,000 / 10,000)."""

    name: str = MISSING
    raw_dir: str = MISSING  # relative to the project root, or absolute
    manifest: Optional[str] = None  # sha256sum file to verify; None: record checksums only
    install_hint: Optional[str] = None  # printed when raw_dir does not exist
    val_fraction: float = 1 / 12
    split_seed: int = 0


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 128
    checkpoint_every: float = 0.5  # in epochs: validate and log every half epoch
    seed: int = 0  # initialisation and per-epoch shuffling
    dtype: str = "float64"
    train_limit: Optional[int] = None  # train on only the first N samples (quick preset)
    val_limit: Optional[int] = None  # validate on only the first N samples (quick preset)


@dataclass
class TrackingConfig:
    uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else sqlite mlflow.db at the root
    experiment_name: str = "birnn-table-19-12"
    probe_timeout_seconds: int = 5  # an unreachable server fails within about this
    flush_every_seconds: float = 15.0  # metrics are buffered and sent in batches


@dataclass
class PathsConfig:
    """Locations relative to the project root (absolute paths are kept as they are); those of
    the pipeline's stages are per dataset (the stage config's ``dataset``)."""

    prepared_dir: str = "data/prepared/${dataset}"
    models_dir: str = "models/${dataset}"
    metrics_dir: str = "metrics/${dataset}"
    evaluation_dir: str = "evaluation/${dataset}"
    reports_dir: str = "reports"
    book_numbers: str = "data/book/table_19_12.yaml"


# ----------------------------------------------------------------------------- stages
@dataclass
class PrepareStage:
    data: DataConfig = MISSING
    paths: PathsConfig = MISSING
    dataset: str = "${data.name}"  # the folder name under the per-dataset paths


@dataclass
class TrainStage:
    model: ModelConfig = MISSING
    train: TrainConfig = MISSING
    tracking: TrackingConfig = MISSING
    paths: PathsConfig = MISSING
    dataset: str = "mnist"  # a prepared dataset: data/prepared/<dataset>/ (conf/data/<dataset>.yaml)
    name: str = "${model.kind}"  # models/<dataset>/<name>/ and the MLflow run name
    register_model: bool = True  # a sweep job: false (conf/train.yaml)
    test_after_training: bool = False  # a sweep job: true
    numerics: str = "pinned"  # or native: birnn.numerics


@dataclass
class EvaluateStage:
    tracking: TrackingConfig = MISSING
    paths: PathsConfig = MISSING
    dataset: str = "mnist"
    models: List[str] = field(default_factory=lambda: ["uni", "bi"])
    numerics: str = "pinned"  # or native: birnn.numerics


@dataclass
class CompareStage:
    tracking: TrackingConfig = MISSING
    paths: PathsConfig = MISSING
    dataset: str = "mnist"
    models: List[str] = field(default_factory=lambda: ["uni", "bi"])  # uni first, as the book
    run_name: str = "table-19-12-${dataset}"
    # the preset the models were trained with (dvc.yaml passes params.yaml's); None: the
    # training runs' preset tag
    preset: Optional[str] = None
    numerics: str = "pinned"  # or native: birnn.numerics


@dataclass
class SweepReportStage:
    tracking: TrackingConfig = MISSING
    paths: PathsConfig = MISSING
    sweep: Any = MISSING  # a sweep id, or a list of them
    confidence: float = 0.95  # of the Welch intervals


def _open_milestones(model_type: type) -> DictConfig:
    """The model schema with ``lr_milestones`` open to new epochs: Hydra puts the whole config
    in struct mode, which would otherwise lock the dict to the epochs its YAML lists, so that
    ``model.lr_milestones={1:0.1}`` failed with "Key '1' is not in struct" (its keys are still
    typed: int)."""
    node = OmegaConf.structured(model_type)
    OmegaConf.set_struct(node.lr_milestones, False)
    return node


def _in_sweep_job() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_job_or(in_sweep_job: Any, otherwise: Any) -> Any:
    """``${sweep_job_or:A,B}``: A in a sweep job (-m), B in a single run or a composed config."""
    return in_sweep_job if _in_sweep_job() else otherwise


def job_folder(name: str) -> str:
    """``${job_folder:x}``: <the sweep job's own folder>/x (Hydra's hydra.runtime.output_dir);
    outside a sweep job, x (unused there: ``sweep_job_or`` picks the other value)."""
    return str(Path(HydraConfig.get().runtime.output_dir) / name) if _in_sweep_job() else name


def register() -> None:
    for name, resolver in (("sweep_job_or", sweep_job_or), ("job_folder", job_folder)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
    cs = ConfigStore.instance()
    cs.store(name="prepare_stage_schema", node=PrepareStage)
    cs.store(name="train_stage_schema", node=TrainStage)
    cs.store(name="evaluate_stage_schema", node=EvaluateStage)
    cs.store(name="compare_stage_schema", node=CompareStage)
    cs.store(name="sweep_report_schema", node=SweepReportStage)
    # Group schemas live under schema/ so that they are not listed as options of the groups;
    # an option pulls in its schema with `- /schema/<name>@_here_` in its defaults list.
    cs.store(group="schema", name="model_uni", node=_open_milestones(UniModelConfig))
    cs.store(group="schema", name="model_bi", node=_open_milestones(BiModelConfig))
    cs.store(group="schema", name="data", node=DataConfig)
    cs.store(group="schema", name="train", node=TrainConfig)
    cs.store(group="schema", name="tracking", node=TrackingConfig)
    cs.store(group="schema", name="paths", node=PathsConfig)


register()


# ----------------------------------------------------------------------------- values
def _fail(key: str, rule: str, value: Any) -> None:
    raise ConfigError(f"{key}: {rule}, got {value!r}")


def _positive(key: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):  # inf would pass '> 0', nan fails it silently
        _fail(key, "must be a finite number > 0", value)


PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")  # a sweep id from a long path fits


def _plain_name(key: str, value: Any) -> None:
    """A folder name under an output folder (models/<dataset>/<name>/), also part of MLflow
    names (runs, registered models): never a path, and one every file system and MLflow hold,
    checked before any work."""
    if not PLAIN_NAME.fullmatch(str(value)):
        _fail(key, "must be a plain folder name: 1 to 200 letters, digits, '.', '_' or '-', "
              "starting with a letter or digit", value)


def _reject_unknown_keys(node: DictConfig, prefix: str = "") -> None:
    """Keys the schema's dataclasses do not declare. Struct mode rejects them at composition,
    except those added with '+' (``+model.hiden_size=8``), which Hydra lets through."""
    schema_type = OmegaConf.get_type(node)
    known = ({f.name for f in dataclasses.fields(schema_type)}
             if dataclasses.is_dataclass(schema_type) else None)
    for key in node:
        if known is not None and key not in known:
            raise ConfigError(f"{prefix}{key}: no such key in the schema (pipeline/schema.py): "
                              f"{prefix.rstrip('.') or 'the config'} has "
                              f"{', '.join(sorted(known))}")
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            _reject_unknown_keys(child, f"{prefix}{key}.")


def _validate_model(model: DictConfig) -> None:
    if model.kind not in MODEL_KINDS:
        _fail("model.kind", f"must be one of {', '.join(MODEL_KINDS)}", model.kind)
    _positive("model.lr", model.lr)
    for epoch, lr in model.lr_milestones.items():
        if not (isinstance(epoch, int) and epoch >= 0):
            _fail("model.lr_milestones", "epochs must be integers >= 0", epoch)
        _positive(f"model.lr_milestones.{epoch}", lr)
    if model.kind == "uni":
        if not model.hidden_size >= 1:
            _fail("model.hidden_size", "must be >= 1", model.hidden_size)
        return
    for key in ("hidden_fwd", "hidden_bwd"):
        if not model[key] >= 1:
            _fail(f"model.{key}", "must be >= 1", model[key])
    if model.merge not in MERGE_MODES:
        _fail("model.merge", f"must be one of {', '.join(MERGE_MODES)}", model.merge)
    if model.merge != "concat" and model.hidden_fwd != model.hidden_bwd:
        _fail("model.hidden_bwd", f"must equal model.hidden_fwd ({model.hidden_fwd}) "
              f"for merge {model.merge!r}", model.hidden_bwd)


def _validate_train(train: DictConfig) -> None:
    for key in ("epochs", "batch_size"):
        if not train[key] >= 1:
            _fail(f"train.{key}", "must be >= 1", train[key])
    if not 0 < train.checkpoint_every <= train.epochs:
        _fail("train.checkpoint_every", f"must be in (0, train.epochs = {train.epochs}] epochs",
              train.checkpoint_every)
    if train.dtype not in FLOAT_DTYPES:
        _fail("train.dtype", f"must be one of {', '.join(FLOAT_DTYPES)}", train.dtype)
    if train.seed < 0:
        _fail("train.seed", "must be >= 0", train.seed)
    for key in ("train_limit", "val_limit"):
        if train[key] is not None and not train[key] >= 1:
            _fail(f"train.{key}", "must be null or >= 1", train[key])


def _validate_data(data: DictConfig) -> None:
    if not 0.0 < data.val_fraction < 1.0:  # training picks its best parameters on validation
        _fail("data.val_fraction", "must be in (0, 1)", data.val_fraction)
    if data.split_seed < 0:
        _fail("data.split_seed", "must be >= 0", data.split_seed)


def _validate_tracking(tracking: DictConfig) -> None:
    if not tracking.probe_timeout_seconds >= 1:
        _fail("tracking.probe_timeout_seconds", "must be >= 1",
              tracking.probe_timeout_seconds)
    if not (math.isfinite(tracking.flush_every_seconds) and tracking.flush_every_seconds >= 0):
        _fail("tracking.flush_every_seconds", "must be a finite number >= 0",
              tracking.flush_every_seconds)
    if not str(tracking.experiment_name).strip():
        _fail("tracking.experiment_name", "must not be empty", tracking.experiment_name)


def lr_milestones(model: DictConfig, epochs: int) -> Dict[int, float]:
    """The milestones ``model`` means for a run of ``epochs`` epochs: ``lr_milestones`` as
    given, or with ``lr_decay_every`` = f, ``lr x lr_decay**k`` from epoch round(k f epochs)
    on (halves up), for every k >= 1 whose epoch falls inside the run."""
    every = model.get("lr_decay_every")
    if every is None:
        return {int(epoch): float(lr) for epoch, lr in model.lr_milestones.items()}
    milestones = {}
    for k in range(1, int(1 / every) + 1):
        epoch = math.floor(k * every * epochs + 0.5)
        if epoch < epochs:
            milestones[epoch] = float(model.lr * model.lr_decay ** k)
    return milestones


def _validate_schedule(model: DictConfig, epochs: int) -> None:
    every = model.get("lr_decay_every")
    if every is None:
        if model.get("lr_decay", 1.0) != 1.0:
            _fail("model.lr_decay", "needs model.lr_decay_every (or leave it at 1.0)",
                  model.lr_decay)
        return
    if not 0 < every <= 1:
        _fail("model.lr_decay_every", "must be null or in (0, 1] (a fraction of train.epochs)",
              every)
    if not 0 < model.lr_decay <= 1:
        _fail("model.lr_decay", "must be in (0, 1]", model.lr_decay)
    if every * epochs < 1:  # two steps would fall on one epoch
        _fail("model.lr_decay_every", f"must leave at least one epoch between steps "
              f"(x train.epochs = {epochs} gives {every * epochs:g})", every)


def validate(cfg: DictConfig) -> DictConfig:
    """Check the values of a composed stage config; return it unchanged or raise ConfigError.

    Only the sections present are checked, so one function serves every stage.
    """
    _reject_unknown_keys(cfg)
    if "model" in cfg:
        _validate_model(cfg.model)
    if "train" in cfg:
        _validate_train(cfg.train)
    if "model" in cfg and "train" in cfg:
        _validate_schedule(cfg.model, cfg.train.epochs)
    if "data" in cfg:
        _validate_data(cfg.data)
    if "tracking" in cfg:
        _validate_tracking(cfg.tracking)
    if "numerics" in cfg and cfg.numerics not in numerics.MODES:
        _fail("numerics", f"must be one of {', '.join(numerics.MODES)} (unset, it is "
              f"${numerics.MODE_ENV}'s)", cfg.numerics)
    if "confidence" in cfg and not 0.5 <= cfg.confidence < 1.0:
        _fail("confidence", "must be in [0.5, 1)", cfg.confidence)
    if "models" in cfg:
        if not cfg.models:
            _fail("models", "must name at least one model", list(cfg.models))
        for name in cfg.models:
            _plain_name("models", name)
    if "name" in cfg:
        _plain_name("name", cfg.name)
        if "model" in cfg and cfg.name in MODEL_KINDS and cfg.name != cfg.model.kind:
            _fail("name", f"is the {cfg.name} model's folder and registered name, and "
                  f"model={cfg.model.kind} trains {cfg.model.kind}: leave name unset or choose "
                  "another", cfg.name)
    if "dataset" in cfg:
        _plain_name("dataset", cfg.dataset)
        if "data" in cfg and cfg.dataset != cfg.data.name:  # prepare: the folder names the data
            _fail("dataset", f"must be data.name ({cfg.data.name}) for the prepare stage: choose "
                  "the dataset with data=<name>", cfg.dataset)
    if "sweep" in cfg and not OmegaConf.is_missing(cfg, "sweep"):  # reports/sweeps/<id>/
        for identifier in (cfg.sweep if OmegaConf.is_list(cfg.sweep) else [cfg.sweep]):
            _plain_name("sweep", identifier)
    return cfg
