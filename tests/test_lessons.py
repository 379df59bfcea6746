"""The shape of every lesson (../shared/TEACHING.md), checked on the stored notebooks without running them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def cells(path: Path) -> list[dict]:
    out = []
    for c in json.loads(path.read_text())["cells"]:
        src = c["source"]
        out.append({**c, "source": "".join(src) if isinstance(src, list) else src})
    return out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_top_cell_has_the_time_needs_and_what_you_should_see_block(path):
    top = cells(path)[0]["source"]
    for part in ("**Time**", "**Needs**", "**What you should see**"):
        assert part in top, f"{path.name}: the top cell lacks {part}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_model_loaded_by_hand_names_its_device(path):
    for i, c in enumerate(cells(path)):
        if c["cell_type"] != "code":
            continue
        for call in re.findall(r"zoo\.load_(?:causal_lm|encoder|vision)\([^)]*\)", c["source"]):
            assert "device=" in call, f"{path.name} cell {i}: {call} — pass device=DEVICE (or say why the CPU)"


def _readme_seconds() -> dict[str, float]:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    row = re.compile(r"^\| `(\d\d[a-z]?_[a-z0-9_]+)` \|.*\| (\d+) s \|$", re.M)
    return {m.group(1): float(m.group(2)) for m in row.finditer(readme)}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_time_a_lesson_states_is_the_one_readme_measured(path):
    """Both come from one nbmake run (tools/notebook_times.py); a hand edit of either breaks this."""
    from labkit.course import parse_spoken, spoken

    measured = _readme_seconds()
    assert path.stem in measured, f"README's notebook table has no time for {path.stem}"
    stated = re.search(r"\*\*Time\*\*: about [^\n]*? in CPU quick mode", cells(path)[0]["source"])
    assert stated, f"{path.name}: no '**Time**: about ... in CPU quick mode' line"
    assert parse_spoken(stated.group(0)) == parse_spoken("about " + spoken(measured[path.stem])), (
        f"{path.name} says {stated.group(0)!r}; README measured {measured[path.stem]:.0f} s "
        "(run tools/notebook_times.py on the JUnit XML of a make test run)")


def test_spoken_times_round_the_way_a_lesson_says_them():
    from labkit.course import parse_spoken, spoken

    assert spoken(27) == "25 seconds" and spoken(95) == "1.5 minutes" and spoken(60) == "1 minute"
    assert spoken(163) == "2.5 minutes" and parse_spoken("about 2.5 minutes") == 150


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_exercise_stub_has_the_signature_its_checker_calls(path):
    """An unwritten stub must fall back with 'not written yet', never with a TypeError from a wrong signature."""
    import ast

    from labkit import exercises

    for c in cells(path):
        checks = re.findall(r'exercises\.check\("(\w+)", (\w+)\)', c["source"]) if c["cell_type"] == "code" else []
        if not checks:
            continue
        defs = [n for n in ast.parse(c["source"]).body if isinstance(n, ast.FunctionDef)]
        scope: dict = {}
        exec(compile(ast.Module(body=defs, type_ignores=[]), path.name, "exec"), scope)
        for name, fn in checks:
            verdict = exercises.verify(name, scope[fn])
            assert "not written yet" in verdict.message, f"{path.name}: stub {fn} for {name!r}: {verdict.message}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_lesson_fits_a_session(path):
    """By one explicit rule (prose words / 100 + code lines / 10 + 10 per exercise check + the quick-mode run time
    README measured), no lesson is longer than a 60-minute session."""
    import json

    from labkit.course import SESSION_LIMIT_MIN, lesson_minutes

    minutes = lesson_minutes(json.loads(path.read_text()), _readme_seconds()[path.stem])
    assert minutes <= SESSION_LIMIT_MIN, f"{path.name} takes {minutes:.0f} minutes by the rule: split it"


def test_the_rule_counts_what_it_says():
    from labkit.course import lesson_minutes

    nb = {"cells": [{"cell_type": "markdown", "source": "word " * 250},
                    {"cell_type": "code", "source": "# a comment\nx = 1\n\ny = exercises.check('a', f)\n"}]}
    assert lesson_minutes(nb, 90) == pytest.approx(2.5 + 0.2 + 10 + 1.5)


def test_the_course_map_is_the_notebooks():
    """docs/course.md (and the bundle's START_HERE.md) carry the course map the notebooks give; `make readme`."""
    from labkit.course import COURSE_PAGE_HEAD, agenda, course_map, lessons

    root = Path(__file__).resolve().parent.parent
    assert (root / "docs" / "course.md").read_text() == COURSE_PAGE_HEAD + course_map(root / "notebooks")
    rows = lessons(root / "notebooks")
    assert [r["id"] for r in rows] == [p.stem.split("_")[0] for p in NOTEBOOKS]
    two = agenda(rows, None, 2)
    assert len(two) == 2 and sum(1 for day in two for _, what in day if what[0].isdigit()) == len(rows)
