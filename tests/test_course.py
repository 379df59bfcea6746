"""The course bundle: one folder with the wheel, every notebook and START_HERE.md; Colab links only where real."""

import json
import zipfile

import pytest

from labkit import LabkitError, course
from labkit.cli import main

from .test_notebooks import NOTEBOOKS, ROOT


@pytest.fixture
def wheel(tmp_path):
    whl = tmp_path / f"{course.WHEEL_PREFIX}-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("labkit/__init__.py", "")
    return whl


def top_cell(path) -> str:
    return json.loads(path.read_text())["cells"][0]["source"]


def test_a_bundle_without_a_repository_carries_no_badge(tmp_path, wheel):
    out = course.build(tmp_path / "labkit-course", wheel, ROOT / "notebooks")
    assert sorted(p.name for p in out.glob("*.ipynb")) == [p.name for p in NOTEBOOKS]
    assert (out / wheel.name).read_bytes() == wheel.read_bytes()
    for p in out.glob("*.ipynb"):
        assert "colab.research.google.com" not in top_cell(p) and course.COLAB_LINE in top_cell(p)
    start = (out / "START_HERE.md").read_text()
    assert start.index("00_setup_and_baselines") < start.index("07_capstone") and wheel.name in start
    for p in NOTEBOOKS:  # each lesson's time and needs, as its own top cell states them
        facts = course.lesson_facts(top_cell(p))
        assert facts["time"] != "not stated" and facts["needs"] != "not stated", p.name
        assert "What you should see" not in facts["needs"]
        assert f"| `{p.name}` | {facts['title']} | {facts['time']} |" in start


def test_a_bundle_with_a_repository_links_each_notebook_to_itself(tmp_path, wheel, capsys):
    assert main(["course", "build", str(tmp_path / "c"), "--wheel", str(wheel), "--notebooks",
                 str(ROOT / "notebooks"), "--repo", "some-org/some-course", "--ref", "v1.2"]) == 0
    for p in (tmp_path / "c").glob("*.ipynb"):
        link = f"https://colab.research.google.com/github/some-org/some-course/blob/v1.2/notebooks/{p.name}"
        text = top_cell(p)
        assert f"]({link}) — {course.COLAB_LINE}" in text and text.count("colab.research.google.com/github") == 1
        nb = json.loads(p.read_text())
        stored = json.loads((ROOT / "notebooks" / p.name).read_text())
        assert nb["cells"][1:] == stored["cells"][1:]  # only the top cell changes
    assert "Colab links open some-org/some-course at v1.2" in capsys.readouterr().out


@pytest.mark.parametrize("repo, ref, match", [("not a repo", "main", "repo='not a repo'"),
                                              ("org/repo", "../x", "ref='../x'"),
                                              ("org/repo", None, "give both")])
def test_bad_arguments_name_the_value_and_leave_nothing_behind(tmp_path, wheel, repo, ref, match):
    with pytest.raises(LabkitError, match=match):
        course.build(tmp_path / "c", wheel, ROOT / "notebooks", repo=repo, ref=ref)
    assert list(tmp_path.iterdir()) == [wheel]  # no half-written bundle


def test_a_wheel_of_another_distribution_is_refused(tmp_path):
    other = tmp_path / "labkit-0.0.3.dev11-py3-none-any.whl"
    other.write_bytes(b"")
    with pytest.raises(LabkitError, match="labkit_inference"):
        course.build(tmp_path / "c", other, ROOT / "notebooks")


def test_badges_replace_each_other_rather_than_pile_up():
    text = "# T\n\nOn Colab: old words\n"
    once = course.with_open_line(text, "https://colab.research.google.com/github/a/b/blob/main/notebooks/x.ipynb")
    twice = course.with_open_line(once, "https://colab.research.google.com/github/a/b/blob/v2/notebooks/x.ipynb")
    assert twice.count("[![Open In Colab]") == 1 and "blob/v2/" in twice
    assert course.with_open_line(twice, None) == course.with_open_line(text, None)
