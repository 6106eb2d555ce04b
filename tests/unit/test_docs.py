"""The documentation's wiring: every page in mkdocs.yml's nav, README's links resolving (the site's own
links and anchors are checked by `make docs`, mkdocs' strict build)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _nav_pages(node: object) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [page for value in node.values() for page in _nav_pages(value)]
    if isinstance(node, list):
        return [page for item in node for page in _nav_pages(item)]
    return []


def _anchors(path: Path) -> set[str]:
    """GitHub's (and the site's) heading ids: lower case, punctuation dropped, spaces as hyphens."""
    anchors, fenced = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (heading := re.match(r"#{1,6} (.+)", line)):
            anchors.add(re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-"))
    return anchors


def test_docs_pages_are_all_in_the_nav() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = _nav_pages(config["nav"])
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    assert sorted(nav) == pages, {"not in nav": set(pages) - set(nav), "no such page": set(nav) - set(pages)}


def test_docs_readme_links_resolve() -> None:
    broken = []
    for target in LINK.findall((ROOT / "README.md").read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s): outside the repository
        path, _, anchor = target.partition("#")
        file = ROOT / path
        if not file.is_file():
            broken.append(f"{target}: no file {path}")
        elif anchor and anchor not in _anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {path}")
    assert not broken, broken
