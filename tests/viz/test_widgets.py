import pytest
import torch

from labkit.results import Record
from labkit.viz import plots, widgets


@pytest.fixture
def weight():
    return torch.randn(64, 200, generator=torch.Generator().manual_seed(0))


def test_more_bits_more_sqnr_more_bytes(weight):
    s4 = widgets.quant_stats(weight, "asymmetric", 4, 64)
    s8 = widgets.quant_stats(weight, "asymmetric", 8, 64)
    assert s8["sqnr_db"] > s4["sqnr_db"] + 20
    assert s8["bytes"] > s4["bytes"]
    assert s4["bits_per_weight"] == pytest.approx((4 * 256 + 4 * 24) / 200)  # padded to 4 groups of 64


def test_figure_has_grid_lines_and_title(weight):
    fig, stats = widgets.quant_explorer_figure(weight, "nf4", 4, 64, title="L")
    ax = fig.axes[0]
    assert len(ax.lines) == 16  # the NF4 grid
    assert "SQNR" in fig.axes[1].get_title()
    assert stats["sqnr_db"] > 15


def test_explorer_updates_without_a_browser(tiny_lm):
    ex = widgets.QuantExplorer(tiny_lm)
    ex.layer.value = "model.layers.1.mlp.down_proj"
    ex.scheme.value = "symmetric"
    ex.bits.value = 8
    stats = ex.update()
    assert stats["sqnr_db"] > 35


def test_scatter_labels_every_variant():
    r = Record("quantization")
    r.add("fp32", model="m", weight_bytes=4.0, perplexity=10.0)
    r.add("int4", model="m", weight_bytes=1.0, perplexity=11.0)
    fig = plots.scatter(r, "weight_bytes", "perplexity", model="m")
    assert [t.get_text() for t in fig.axes[0].texts] == ["fp32", "int4"]
