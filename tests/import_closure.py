"""The project modules a stage runs: its entry module's imports, followed transitively within
birnn/, pipeline/ and study/, plus the classes its Hydra config instantiates (``_target_``)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGES = ("birnn", "pipeline", "study")


def module_file(root: Path, name: str) -> Path | None:
    """pipeline.sweeps.job -> pipeline/sweeps/job.py (or a package's __init__.py)."""
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # "from pipeline import files": files may be a module of the package
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in names if n.split(".")[0] in PACKAGES}


def _with_packages(root: Path, name: str) -> list[Path]:
    """The module's file and the __init__.py of every package above it (Python runs them)."""
    parts = name.split(".")
    found = [module_file(root, ".".join(parts[:i])) for i in range(1, len(parts) + 1)]
    return [f for f in found if f is not None]


def hydra_targets(config_file: Path) -> set[str]:
    text = config_file.read_text(encoding="utf-8")
    return {target.rsplit(".", 1)[0]
            for target in re.findall(r"^\s*_target_:\s*([\w.]+)", text, flags=re.M)
            if target.split(".")[0] in PACKAGES}


def closure(root: Path, entry_module: str, config_file: Path | None = None) -> set[str]:
    """Files (relative to ``root``, posix) of every project module ``entry_module`` runs."""
    pending = [entry_module, *(hydra_targets(config_file) if config_file else ())]
    files: set[Path] = set()
    while pending:
        for path in _with_packages(root, pending.pop()):
            if path not in files:
                files.add(path)
                pending.extend(_imported_names(path))
    return {path.relative_to(root).as_posix() for path in files}
