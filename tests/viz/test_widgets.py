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


def test_kv_viewer_draws_pool_and_steps(tiny_lm):
    from labkit.serve import LLM, SamplingParams

    llm = LLM(tiny_lm, None, block_size=4, num_blocks=40, max_model_len=64, record_history=True)
    llm.generate([[5] * 9, [6] * 3, [7] * 20], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                 use_tqdm=False)
    hist = llm.stats.history
    assert len(hist) == llm.stats.steps
    fig = widgets.kv_pool_figure(hist[0], cols=10)
    assert "blocks used" in fig.axes[0].get_title()
    used = len(hist[0]["owners"])
    assert used == sum(-(-n // 4) for n in (9, 3, 20))
    viewer = widgets.KVCacheViewer(hist, cols=10)
    viewer.step.value = len(hist) - 1
    assert viewer.update()["step"] == hist[-1]["step"]


def test_kv_viewer_needs_history():
    from labkit import LabkitError

    with pytest.raises(LabkitError, match="record_history"):
        widgets.KVCacheViewer([])
