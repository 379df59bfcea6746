"""README is a guide: at most 150 lines, its headline table equal to the reference records, every link it and the
docs make resolving inside the repository."""

import re
from pathlib import Path

import pytest

from labkit import report

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "DESIGN.md", *sorted((ROOT / "docs").glob("*.md"))]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_is_short_and_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    quick = text[text.index("## Quick start"):]
    assert quick.index("make report") < quick.index("make test") < quick.index("## Headline results")


def test_readme_numbers_are_the_reference_records():
    text = (ROOT / "README.md").read_text()
    block = text.split(report.README_BEGIN)[1].split(report.README_END)[0]
    assert block.strip() == report.readme_table().strip(), "run `make readme`"
    assert block.count("\n| ") >= 9  # one row per experiment with a record


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_resolves_inside_the_repository(page):
    text = page.read_text()
    assert "../shared" not in text, f"{page.name} points outside the repository"
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.is_file() and ROOT in file.parents, f"{page.name} links to {target}, which is not here"
        if anchor:
            headings = {_slug(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), flags=re.M)}
            assert anchor in headings, f"{page.name} links to {target}: no such heading"


def test_the_package_points_at_no_file_outside_the_repository():
    for f in (ROOT / "labkit").rglob("*.py"):
        assert "../shared" not in f.read_text(), f
