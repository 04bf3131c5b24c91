"""Every relative link in README.md, CHANGELOG.md and docs/**/*.md points to a file or folder that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").rglob("*.md")])

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~)")


def relative_links(text: str) -> list[str]:
    """Targets of markdown links and images outside code blocks and inline code, without #anchors;
    absolute URLs and pure anchors are skipped."""
    found, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            in_fence = not in_fence
            continue
        if in_fence or line.startswith("    "):
            continue
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue
            found.append(target.split("#", 1)[0])
    return found


def test_relative_links_are_found():
    text = "see [a](docs/a.md#x), ![img](../b.png) and [web](https://flower.ai), `[not](c.md)`\n    [code](d.md)\n"
    assert relative_links(text) == ["docs/a.md", "../b.png"]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_resolves(page: Path):
    broken = []
    for target in relative_links(page.read_text(encoding="utf-8")):
        path = (page.parent / target).resolve()
        if path.exists():
            continue
        broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"
