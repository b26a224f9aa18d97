"""The README's own links: section anchors that exist and files that are in the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _headings() -> set[str]:
    """The anchors of the README's headings (lines starting with # outside code blocks)."""
    found, in_code = set(), False
    for line in README.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif line.startswith("#") and not in_code:
            found.add(_slug(line.lstrip("#")))
    return found


def test_every_section_link_names_a_heading() -> None:
    headings = _headings()
    anchors = [target[1:] for target in LINK.findall(README) if target.startswith("#")]
    assert len(anchors) > 10  # the contents line, at least
    assert [anchor for anchor in anchors if anchor not in headings] == []


def test_every_relative_link_is_a_file_of_the_repository() -> None:
    paths = [t for t in LINK.findall(README) if not t.startswith(("#", "http://", "https://"))]
    assert paths  # the plots
    assert [path for path in paths if not (ROOT / path).is_file()] == []
