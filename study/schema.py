"""Typed schema of the study's configuration (study/conf/findings.yaml), in Hydra's ConfigStore."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from pipeline.schema import PathsConfig


@dataclass
class CellConfig:
    """A group of seeds: the finished runs of ``kind`` in sweep ``sweep`` (optionally only
    ``hidden`` units per chain, only merge ``merge``), trained with ``schedule``."""

    label: str = MISSING
    sweep: str = MISSING
    kind: str = MISSING  # uni | bi
    hidden: Optional[int] = None
    merge: Optional[str] = None
    schedule: Optional[str] = None  # constant | steps (study/data.py SCHEDULES); None: as run


@dataclass
class ComparisonConfig:
    """Cell ``a`` minus cell ``b`` in test accuracy (best parameters), and what the last
    page answered to it (in this page's verdict words; empty: a new question)."""

    a: str = MISSING
    b: str = MISSING
    confirmatory: bool = False  # in the Holm family; otherwise exploratory
    earlier: str = ""
    earlier_detail: str = ""  # the last page's numbers, quoted


@dataclass
class SectionConfig:
    name: str = MISSING  # short, for its figures' file names (reports/findings/<name>_*.png)
    title: str = MISSING
    primary: bool = False  # the book's claim: its verdict is worded as the claim's
    question: str = MISSING
    cells: List[CellConfig] = field(default_factory=list)
    comparisons: List[ComparisonConfig] = field(default_factory=list)
    # four cell labels [a, b, c, d]: the interaction (a - b) - (c - d), exploratory
    interaction: List[str] = field(default_factory=list)
    figure: str = "per_seed"  # per_seed | by_size | none
    searches: List[str] = field(default_factory=list)  # Optuna sweeps whose trials it lists
    test_set_uncertainty: bool = False  # McNemar on the DVC pipeline's predictions
    notes: str = ""
    commands: List[str] = field(default_factory=list)
    earlier_titles: List[str] = field(default_factory=list)  # its titles on earlier pages


@dataclass
class FindingsConfig:
    paths: PathsConfig = field(default_factory=PathsConfig)
    dataset: str = "mnist"  # whose DVC predictions give the test set's own uncertainty
    confidence: float = 0.95
    sections: List[SectionConfig] = field(default_factory=list)


ConfigStore.instance().store(name="findings_schema", node=FindingsConfig)
