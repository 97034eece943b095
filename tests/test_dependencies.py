"""pyproject.toml declares every package the code imports, and the lock files that `make setup`,
`make test` and `make test-ui` install from (requirements/*.txt) pin exactly what it declares,
inside its ranges, one version per package across the three."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("birnn", "pipeline", "tests", "scripts", "benchmarks")
PROJECT = "birnn"
# The lock each install set comes from, and the pyproject.toml extras it holds.
LOCKS = {"setup": (), "test": ("test",), "ui": ("test", "ui")}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirements(extras: tuple[str, ...]) -> dict[str, Requirement]:
    """The requirements of the project with these extras, by normalized name (self-references
    such as birnn[server] expanded)."""
    project = pyproject()
    found, todo, seen = {}, list(project["dependencies"]), set()
    for extra in extras:
        todo += project["optional-dependencies"][extra]
        seen.add(extra)
    while todo:
        req = Requirement(todo.pop())
        if normalize(req.name) == PROJECT:
            for extra in req.extras - seen:
                todo += project["optional-dependencies"][extra]
                seen.add(extra)
        else:
            found[normalize(req.name)] = req
    return found


def lock(name: str) -> dict[str, str]:
    """requirements/<name>.txt as {normalized name: version}."""
    pins = {}
    for line in (ROOT / "requirements" / f"{name}.txt").read_text().splitlines():
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if match:
            pins[normalize(match.group(1))] = match.group(2)
    return pins


def third_party_imports() -> dict[str, set[str]]:
    """Dotted names of the imports of non-standard, non-project modules -> the files importing them."""
    files = [path for folder in SCANNED for path in (ROOT / folder).rglob("*.py")]
    own = {"birnn", "pipeline"} | {path.stem for path in (ROOT / "tests").glob("*.py")}  # test helpers
    found: dict[str, set[str]] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in own:
                    found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def distributions(module: str) -> set[str]:
    """The installed distributions that may provide ``module``: those shipping its top-level
    package (mlflow: mlflow, mlflow-skinny, ...), or for a namespace package the one shipping
    its subpackage (hydra_plugins.<plugin>). Not installed (playwright outside `make test-ui`):
    its own name."""
    parts = module.split(".")
    names = set(_top_level_distributions().get(parts[0], []))
    spec = importlib.util.find_spec(parts[0]) if names else None
    if len(parts) > 1 and spec is not None and spec.origin is None:   # a namespace package
        prefix = "/".join(parts[:2])
        names = {name for name in names
                 if any(str(f).startswith((prefix + "/", prefix + ".py"))
                        for f in importlib.metadata.distribution(name).files or ())} or names
    return {normalize(name) for name in names} or {normalize(parts[0])}


@functools.cache
def _top_level_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def test_every_import_is_declared():
    declared = set(requirements(tuple(pyproject()["optional-dependencies"])))
    imports = third_party_imports()
    assert {"numpy", "scipy", "yaml", "hydra_plugins.hydra_optuna_sweeper._impl"} <= set(imports), \
        "the import scan misses imports it should see"
    undeclared = {module: sorted(files) for module, files in imports.items()
                  if not distributions(module) & declared}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


@pytest.mark.parametrize("name", LOCKS)
def test_lock_pins_what_pyproject_declares_within_its_ranges(name):
    pins = lock(name)
    wanted = requirements(LOCKS[name])
    missing = sorted(set(wanted) - set(pins))
    assert not missing, f"requirements/{name}.txt lacks {missing}: run `make lock`"
    outside = {dist: f"{pins[dist]} not {req.specifier}" for dist, req in wanted.items()
               if not req.specifier.contains(pins[dist], prereleases=True)}
    assert not outside, f"requirements/{name}.txt is stale, run `make lock`: {outside}"


def test_locks_agree_and_install_only_their_own_extras():
    setup, test, ui = lock("setup"), lock("test"), lock("ui")
    assert setup.items() <= test.items() <= ui.items(), "a package has two versions across the locks"
    # `make test` installs no browser driver; `make setup` no test tooling
    assert "playwright" in ui and "playwright" not in test
    assert {"pytest", "pytest-xdist", "psycopg"} <= set(test)
    assert not {"pytest", "pytest-xdist", "psycopg", "playwright"} & set(setup)
