"""The docs stay usable: README.md fits in 10 KiB, and every relative link in README.md and
docs/*.md points to a file that exists (and, for a #fragment into a Markdown file, to one of
its headings). Reads files only: no network, no subprocess."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_BYTES = 10 * 1024

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
# [text](target) and ![alt](target), with an optional "title"; <target> also allowed.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.MULTILINE)


def prose(text: str) -> str:
    """``text`` without fenced code blocks and code spans, where brackets are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def links(page: Path) -> list[str]:
    return LINK.findall(prose(page.read_text(encoding="utf-8")))


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces as hyphens."""
    found = set()
    for title in HEADING.findall(prose(page.read_text(encoding="utf-8"))):
        title = re.sub(r"[`*_]|!?\[([^\]]*)\]\([^)]*\)", r"\1", title).strip().lower()
        found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def test_readme_fits_in_10_kib():
    size = README.stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes, more than {README_MAX_BYTES}"


def test_docs_pages_exist():
    names = {page.name for page in PAGES}
    assert {"tracking.md", "sweeps.md", "failures.md", "testing.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    broken = []
    for target in links(page):
        if not target or EXTERNAL.match(target):
            continue
        path, _, fragment = target.partition("#")
        resolved = (page.parent / unquote(path)).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{target}: no heading #{fragment} in {resolved.name}")
        elif not resolved.is_relative_to(ROOT):
            broken.append(f"{target}: outside the repository")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_link_checker_finds_links(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text("# A title, here\n[a](x.md) ![b](img/y.png \"t\") [c](https://e.org) "
                    "`[d](not-a-link.md)`\n```\n[e](nor-this.md)\n```\n[f](#a-title-here)\n")
    assert links(page) == ["x.md", "img/y.png", "https://e.org", "#a-title-here"]
    assert anchors(page) == {"a-title-here"}


@pytest.mark.parametrize("installed, commands", [
    ("", ["dvc repro compare@mnist", "sudo apt-get install dataset-fashion-mnist && make reproduce"]),
    ("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz", ["dvc repro"]),
])
def test_make_reproduce_without_fashion_mnist_makes_mnists_table(installed, commands):
    # The front door's first command exits 0 on a machine without Debian's package, and its
    # last line says how to add Fashion-MNIST (make -n: what it would run).
    outer = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")  # when the suite itself runs under make
    env = {k: v for k, v in os.environ.items() if k not in outer}
    result = subprocess.run(["make", "--no-print-directory", "-n", "-o", ".venv/.installed",
                             "reproduce", f"FASHION_MNIST={installed}"], cwd=ROOT, env=env,
                            capture_output=True, text=True, check=True)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines[0] == commands[0]
    assert commands[-1] in lines[-1]
