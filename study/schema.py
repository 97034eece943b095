"""Typed schema of the study's configuration (study/conf/findings.yaml), in Hydra's ConfigStore."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from hydra.core.config_store import ConfigStore

from pipeline.schema import PathsConfig, TrackingConfig


@dataclass
class Finding:
    """One question of the findings page: the sweeps that answer it and the commands that
    made them (quoted on the page)."""

    sweeps: List[str] = field(default_factory=list)
    commands: List[str] = field(default_factory=list)


@dataclass
class FindingsConfig:
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    confidence: float = 0.95
    claim: Finding = field(default_factory=Finding)  # the book configuration over seeds
    capacity: Finding = field(default_factory=Finding)  # accuracy against parameter count
    merges: Finding = field(default_factory=Finding)  # bi's four merges
    fashion: Finding = field(default_factory=Finding)  # both models on Fashion-MNIST
    tuned: Finding = field(default_factory=Finding)  # a tuned bi net against the book's


ConfigStore.instance().store(name="findings_schema", node=FindingsConfig)
