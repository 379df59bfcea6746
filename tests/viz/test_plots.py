"""Figures built from the reference records: labels that do not collide, no chart that compares nothing."""

import pytest

from labkit.results import load_reference
from labkit.viz import plots


@pytest.fixture(scope="module")
def quant():
    ref = load_reference("quantization", "cpu-epyc-2core")
    if ref is None:
        pytest.skip("no quantization reference record in this checkout")
    return ref[0]


def test_scatter_labels_never_overlap(quant):
    """SmolLM2's variants sit within a few MB and a few hundredths of perplexity of each other: every label still
    gets a box of its own."""
    fig = plots.scatter(quant, "weight_bytes", "perplexity", model="smollm2-135m")
    labels = fig.axes[0].texts
    assert len(labels) >= 10
    boxes = plots.label_boxes(fig, labels)
    clashes = [(a.get_text(), b.get_text()) for i, (a, p) in enumerate(zip(labels, boxes))
               for b, q in zip(labels[i + 1:], boxes[i + 1:]) if p.overlaps(q)]
    assert not clashes


def test_spread_labels_moves_only_what_collides():
    fig = plots.new_figure((4, 3))
    ax = fig.subplots()
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 10)
    far = ax.annotate("far", (1, 1), textcoords="offset points", xytext=(5, 0))
    a = ax.annotate("same place", (5, 5), textcoords="offset points", xytext=(5, 0))
    b = ax.annotate("same place too", (5, 5), textcoords="offset points", xytext=(5, 0))
    plots.spread_labels(fig, [far, a, b])
    assert far.xyann == (5, 0) and a.xyann == (5, 0)
    assert b.xyann[1] > 0
    pa, pb = plots.label_boxes(fig, [a, b])
    assert not pa.overlaps(pb)


def test_no_one_bar_charts():
    from labkit.results import Record

    rec = Record("demo")
    rec.add("fp32", model="a", tokens_per_s=1.0)
    rec.add("fp32", model="b", tokens_per_s=2.0)
    assert plots.default_figures(rec) == []  # one variant a model: the table says it
    rec.add("bf16", model="a", tokens_per_s=1.5)
    figs = plots.default_figures(rec)  # model a has two bars to compare; b still has one, so no chart of its own
    assert len(figs) == 1 and len(figs[0].axes[0].patches) == 2
    base = load_reference("baseline")  # the baseline's bf16 rows (where bf16 is native) give two bars a model
    for fig in plots.default_figures(base[0]) if base else []:
        assert len(fig.axes[0].patches) >= 2


def test_capstone_tradeoff_labels_never_overlap():
    """Notebook 07's dense corner (review finding): every variant's label in a place of its own."""
    from labkit.capstone.figures import tradeoff_figure
    from labkit.select import load_rows

    rows = load_rows(None)  # every reference record, every machine: the densest picture the widget draws
    fig, _ = tradeoff_figure(rows, model="digits-cnn", metric="accuracy", hardware=None)
    labels = fig.axes[0].texts
    boxes = plots.label_boxes(fig, labels)
    assert len(labels) >= 4
    assert not [(a.get_text(), b.get_text()) for i, (a, p) in enumerate(zip(labels, boxes))
                for b, q in zip(labels[i + 1:], boxes[i + 1:]) if p.overlaps(q)]
