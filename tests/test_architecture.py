"""docs/architecture.md's tree matches the code: every module of birnn/, pipeline/, study/,
benchmarks/ and scripts/ is named there, and every module named there exists."""

from __future__ import annotations

import re

from pipeline_testkit import ROOT

DOC = ROOT / "docs" / "architecture.md"
PACKAGES = ("birnn", "pipeline", "study", "benchmarks", "scripts")


def named_in_tree(text: str) -> set[str]:
    """Module paths of the tree block under '## The tree': a line opening with 'name/' enters
    that folder (by indentation); every 'x.py' on a line is a module of the innermost folder."""
    section = text.split("## The tree", 1)[1]
    block = re.search(r"```\n(.*?)```", section, flags=re.S).group(1)
    folders: list[tuple[int, str]] = []  # (indent, name)
    named = set()
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        tokens = line.split()
        if tokens[0].endswith("/"):
            folders = [f for f in folders if f[0] < indent] + [(indent, tokens[0].rstrip("/"))]
        else:
            folders = [f for f in folders if f[0] < indent]
        prefix = [name for _, name in folders]
        named.update("/".join([*prefix, token]) for token in tokens if token.endswith(".py"))
    return named


def modules() -> set[str]:
    return {path.relative_to(ROOT).as_posix() for package in PACKAGES
            for path in (ROOT / package).rglob("*.py")
            if path.name != "__init__.py" and "tests" not in path.relative_to(ROOT).parts}


def test_every_module_is_named_in_the_architecture_tree():
    missing = sorted(modules() - named_in_tree(DOC.read_text(encoding="utf-8")))
    assert missing == [], f"docs/architecture.md's tree does not name {missing}"


def test_every_module_the_tree_names_exists():
    stale = sorted(named_in_tree(DOC.read_text(encoding="utf-8")) - modules())
    assert stale == [], f"docs/architecture.md's tree names modules that do not exist: {stale}"


def test_the_tree_parser_reads_folders_by_indentation():
    text = "## The tree\n```\nbirnn/   data.py\npipeline/\n  stages/  train.py\n" \
           "           evaluate.py\n  files.py   atomic output\n```\n"
    assert named_in_tree(text) == {"birnn/data.py", "pipeline/stages/train.py",
                                   "pipeline/stages/evaluate.py", "pipeline/files.py"}
