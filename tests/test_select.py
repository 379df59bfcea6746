"""Pareto fronts, selection with thresholds, and loading errors."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from labkit import LabkitError, select
from labkit.results import Record


def test_pareto_single_point_ties_and_duplicates():
    assert select.pareto_front([(1.0, 0.5)]) == [0]
    # (2, .9) dominates (3, .9) (same quality, higher cost) and (2, .8); the duplicate (1, .5) pair stays
    pts = [(1, 0.5), (1, 0.5), (2, 0.9), (3, 0.9), (2, 0.8), (4, 0.95)]
    assert select.pareto_front(pts) == [0, 1, 2, 5]
    # lower-is-better quality (perplexity)
    assert select.pareto_front([(1, 30.0), (2, 20.0), (3, 25.0)], higher_is_better=False) == [0, 1]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20)), min_size=1, max_size=25))
def test_front_points_are_undominated_and_the_rest_dominated(pts):
    front = set(select.pareto_front(pts))
    assert front
    for i, p in enumerate(pts):
        dominated = any(select.dominates(q, p, True) for q in pts)
        assert (i in front) == (not dominated)


def rows():
    r = Record("pruning")
    r.add("dense", model="m", weight_bytes=100, accuracy=0.975, perplexity=10.0)
    r.add("small", model="m", weight_bytes=40, accuracy=0.970, perplexity=10.5)
    r.add("tiny", model="m", weight_bytes=10, accuracy=0.60, perplexity=40.0, recipe=["prune 90%", "no recovery"])
    return [{**v, "experiment": "pruning", "hardware": "this machine"} for v in r.variants]


def test_select_with_thresholds():
    c = select.select(rows(), model="m", metric="accuracy", within=0.015)
    assert c.variant["name"] == "small" and "lowest weight_bytes" in c.reason and c.baseline["name"] == "dense"
    assert select.select(rows(), model="m", metric="accuracy", within=0.5).variant["name"] == "tiny"
    assert select.select(rows(), model="m", metric="accuracy", within=0.5).recipe == ["prune 90%", "no recovery"]
    assert select.select(rows(), model="m", metric="perplexity", within=0.1).variant["name"] == "small"
    assert select.select(rows(), model="m", metric="perplexity", within=0.01).variant["name"] == "dense"
    assert {r["name"] for r in select.select(rows(), model="m", metric="accuracy", within=0).front} == \
        {"dense", "small", "tiny"}


def test_thresholds_and_the_closest_when_none_meets():
    assert select.select(rows(), model="m", metric="accuracy", threshold=0.97).variant["name"] == "small"
    assert select.select(rows(), model="m", metric="perplexity", threshold=12).variant["name"] == "small"
    with pytest.raises(LabkitError, match=r"accuracy >= 0.99; the closest is dense at 0.975, 0.015 short"):
        select.select(rows(), model="m", metric="accuracy", threshold=0.99)
    with pytest.raises(LabkitError, match="exactly one of within= .* or threshold="):
        select.select(rows(), model="m", metric="accuracy")


def test_bad_arguments():
    with pytest.raises(ValueError, match="metric='speed'"):
        select.select(rows(), model="m", metric="speed", within=0.1)
    with pytest.raises(LabkitError, match="cost='joules'"):
        select.select(rows(), model="m", metric="accuracy", within=0.1, cost="joules")
    with pytest.raises(LabkitError, match="within=-1"):
        select.select(rows(), model="m", metric="accuracy", within=-1)
    with pytest.raises(LabkitError, match=r"no variant of model='x'.*models that do: \['m'\]"):
        select.select(rows(), model="x", metric="accuracy", within=0.1)
    with pytest.raises(LabkitError, match="no baseline variant"):
        select.select(rows(), model="m", metric="accuracy", within=0.1, baseline="fp64")


def test_loading_errors(tmp_path):
    with pytest.raises(LabkitError, match="does not exist"):
        select.load_rows(tmp_path / "nope", include_reference=False)
    with pytest.raises(LabkitError, match="no records found"):
        select.load_rows(tmp_path, include_reference=False)
    (tmp_path / "pruning.json").write_text("{not json")
    with pytest.raises(LabkitError, match=r"pruning.json is not a readable labkit record.*labkit run pruning"):
        select.load_rows(tmp_path, include_reference=False)
    old = Record("pruning", labkit_version="0.0.1")
    old.add("dense", model="m", accuracy=1.0)
    (tmp_path / "pruning.json").write_text(json.dumps(old.to_dict()))
    with pytest.raises(LabkitError, match=r"written by labkit 0.0.1.*rerun `labkit run pruning --quick`"):
        select.load_rows(tmp_path, include_reference=False)
    got = select.load_rows(tmp_path, include_reference=False, allow_old=True)
    assert got[0]["hardware"] == "this machine" and got[0]["experiment"] == "pruning"


def test_reference_records_load_with_their_hardware():
    rs = select.load_rows(None)
    assert {r["hardware"] for r in rs} >= {"cpu-epyc-2core"}
    c = select.select(rs, model="digits-cnn", metric="accuracy", within=0.015, hardware="cpu-epyc-2core",
                      experiment="pruning")
    assert c.variant["name"] == "structured-40-finetuned"
