"""The code's imports: public API of its dependencies only (no ``_internal`` module, no
underscored name of mlflow or hydra), no import circle, and the layering of the tree: the study
builds on the package and never the reverse, only commands import the entry wrapper, and no
stage imports another."""

from __future__ import annotations

import ast
from pathlib import Path

from import_closure import _imported_names, module_file
from pipeline_testkit import ROOT

PACKAGE = ROOT / "pipeline"
CODE = [ROOT / "pipeline", ROOT / "study", ROOT / "birnn"]
CHECKED = ("mlflow", "hydra", "omegaconf")


def private_uses(source: str) -> list[str]:
    """The private names ``source`` uses from CHECKED packages: a module path with an
    underscored part (``hydra._internal.utils``), an underscored name imported from one
    (``from mlflow.x import _y``), an underscored attribute of one (``mlflow._x``,
    ``tracking_utils._tracking_uri`` after ``from mlflow... import utils as tracking_utils``),
    and the text ``_internal`` anywhere (a logger's name, a string)."""
    found = ["_internal"] if "_internal" in source else []
    aliases: set[str] = set()  # local names bound to a module or object of CHECKED
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in CHECKED:
                    aliases.add((alias.asname or alias.name).split(".")[0])
                    found += [alias.name] if _private_path(alias.name) else []
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in CHECKED:
                found += [node.module] if _private_path(node.module) else []
                for alias in node.names:
                    aliases.add(alias.asname or alias.name)
                    if _private(alias.name):
                        found.append(f"{node.module}.{alias.name}")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in aliases:
                found.append(f"{root.id}...{node.attr}")
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_path(module: str) -> bool:
    return any(_private(part) for part in module.split("."))


def test_the_private_name_search_finds_what_it_must():
    leaky = ("from hydra._internal.utils import get_args_parser\n"
             "from mlflow.tracking import _tracking_service\n"
             "from mlflow.tracking._tracking_service import utils as tracking_utils\n"
             "import mlflow\n"
             "saved = tracking_utils._tracking_uri\n"
             "mlflow._something.call()\n"
             "log = logging.getLogger('mlflow.utils._internal_thing')\n")
    assert private_uses(leaky) == [
        "_internal", "hydra._internal.utils", "mlflow.tracking._tracking_service",
        "mlflow.tracking._tracking_service", "tracking_utils..._tracking_uri", "mlflow..._something"]
    clean = ("import mlflow\nfrom mlflow.entities import Metric\n"
             "class A:\n    def f(self):\n        return self._client._x\n"
             "from __future__ import annotations\n")
    assert private_uses(clean) == []


def test_the_package_uses_only_public_names_of_mlflow_and_hydra():
    found = {str(path.relative_to(ROOT)): uses
             for folder in CODE for path in sorted(folder.rglob("*.py"))
             if (uses := private_uses(path.read_text(encoding="utf-8")))}
    assert found == {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module of pipeline/, study/ or birnn/ -> the project modules it imports (at any depth
    of its code)."""
    graph = {}
    for path in sorted(p for folder in CODE for p in folder.rglob("*.py")):
        graph[_module_name(path)] = {_module_name(module_file(ROOT, name))
                                     for name in _imported_names(path)
                                     if module_file(ROOT, name) is not None}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, each once, as the modules on it (a depth-first search)."""
    found, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_the_cycle_search_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_the_package():
    graph = import_graph()
    assert "pipeline.tracking.stale_runs" in graph["pipeline.tracking.store"]  # (it sees them)
    assert cycles(graph) == []


ENTRY_MODULES = ("pipeline.stages.", "pipeline.commands.", "study.findings")


def test_the_layers_of_the_tree():
    graph = import_graph()
    assert "study.statistics" in graph["study.findings"]  # (it sees the study's imports)
    # the study builds on the package; the package knows nothing of it
    assert [m for m, imported in graph.items() if m.startswith(("pipeline", "birnn"))
            and any(i.startswith("study") for i in imported)] == []
    # only commands import the entry wrapper; a library module is callable without Hydra's app
    assert sorted(m for m, imported in graph.items() if "pipeline.guard.entrypoint" in imported
                  and not m.startswith(ENTRY_MODULES)) == []
    # no stage imports another stage
    assert [(m, i) for m, imported in graph.items() if m.startswith("pipeline.stages.")
            for i in imported if i.startswith("pipeline.stages.")] == []
    # the expected errors are at the bottom: errors.py imports only birnn's error types
    assert {i for i in graph["pipeline.guard.errors"]} <= {"birnn", "birnn.data", "birnn.training",
                                                          "birnn.numerics"}

