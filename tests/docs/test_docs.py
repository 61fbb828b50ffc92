"""The README and the docs/ pages it links to: the README stays what a new
user reads in the first ten minutes, each page is linked from it, every link
between them leads to a file and a heading that exist, and the architecture
page names every package of otel_bridge."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))

LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def anchors(path: Path) -> set[str]:
    """The headings' anchors, made as GitHub makes them."""
    text = FENCE.sub("", path.read_text())
    return {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            for line in text.splitlines() if line.startswith("#")}


def test_the_readme_is_under_10_kb():
    assert README.stat().st_size < 10_000


def test_the_readme_links_every_page():
    readme = README.read_text()
    assert PAGES
    for page in PAGES:
        assert f"](docs/{page.name}" in readme, page.name


@pytest.mark.parametrize("path", [README, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_leads_to_a_file_and_heading_that_exist(path):
    for target in LINK.findall(FENCE.sub("", path.read_text())):
        if target.startswith(("http://", "https://")):
            continue
        name, _, anchor = target.partition("#")
        linked = (path.parent / name).resolve() if name else path
        assert linked.exists(), f"{path.name}: {target}"
        if anchor:
            assert anchor in anchors(linked), f"{path.name}: {target}"


def test_the_architecture_page_names_each_packages_public_seam():
    package = ROOT / "otel_bridge"
    parts = [f"{p.name}/" for p in package.iterdir() if (p / "__init__.py").is_file()]
    parts += [p.name for p in package.glob("*.py")
              if p.name not in ("__init__.py", "__main__.py", "_version.py")]
    rows = [line for line in (DOCS / "architecture.md").read_text().splitlines()
            if line.startswith("| `")]
    for part in sorted(parts):
        assert any(row.startswith(f"| `{part}` | ") for row in rows), part
