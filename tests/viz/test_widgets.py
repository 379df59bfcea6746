import pytest
import torch

from labkit.capstone import figures as capstone_figures
from labkit.distill import figures as distill_figures
from labkit.export import figures as export_figures
from labkit.prune import figures as prune_figures
from labkit.quant import figures as quant_figures
from labkit.quant.explore import quant_stats
from labkit.results import Record
from labkit.serve import figures as serve_figures
from labkit.serve.bench import kv_history
from labkit.viz import plots, widgets


@pytest.fixture
def weight():
    return torch.randn(64, 200, generator=torch.Generator().manual_seed(0))


def test_more_bits_more_sqnr_more_bytes(weight):
    s4 = quant_stats(weight, "asymmetric", 4, 64)
    s8 = quant_stats(weight, "asymmetric", 8, 64)
    assert s8["sqnr_db"] > s4["sqnr_db"] + 20
    assert s8["bytes"] > s4["bytes"]
    assert s4["bits_per_weight"] == pytest.approx((4 * 256 + 4 * 24) / 200)  # padded to 4 groups of 64


def test_figure_has_grid_lines_and_title(weight):
    fig, stats = quant_figures.quant_explorer_figure(weight, "nf4", 4, 64, title="L")
    ax = fig.axes[0]
    assert len(ax.lines) == 16  # the NF4 grid
    assert "SQNR" in fig.axes[1].get_title()
    assert stats["sqnr_db"] > 15


def test_explorer_updates_without_a_browser(tiny_lm):
    ex = quant_figures.QuantExplorer(tiny_lm)
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
    fig = serve_figures.kv_pool_figure(hist[0], cols=10)
    assert "blocks used" in fig.axes[0].get_title()
    used = len(hist[0]["owners"])
    assert used == sum(-(-n // 4) for n in (9, 3, 20))
    viewer = serve_figures.KVCacheViewer(hist, cols=10)
    viewer.step.value = len(hist) - 1
    assert viewer.update()["step"] == hist[-1]["step"]


def test_kv_viewer_needs_history():
    from labkit import LabkitError

    with pytest.raises(LabkitError, match="record_history"):
        serve_figures.KVCacheViewer([])


def test_block_tables_show_logical_to_physical_and_sharing(tiny_lm):
    from labkit.serve import LLM, SamplingParams
    from labkit.serve.figures import admitted_figure, block_tables_figure, waste_figure

    llm = LLM(tiny_lm, None, block_size=4, num_blocks=40, max_model_len=64, record_history=True)
    llm.generate([[5] * 9], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, n=2), use_tqdm=False)
    snap = next(s for s in llm.stats.history if len(s["block_tables"]) == 2)
    a, b = snap["block_tables"].values()
    assert a[:2] == b[:2]  # the prompt's full blocks are shared by both samples
    fig = block_tables_figure(snap, cols=10)
    labels = {t.get_text() for t in fig.axes[0].texts}
    assert {str(a[0]), str(a[1])} <= labels and any(t.startswith("req ") for t in labels)
    assert "running 2" in fig.axes[1].get_title()
    fig = admitted_figure({"paged": llm.stats.history})
    assert "steps" in fig.axes[0].get_legend().get_texts()[0].get_text()
    fig = waste_figure({"paged": llm.stats.waste_breakdown_pct()})
    assert len(fig.axes[0].patches) == 4 and "internal fragmentation" in str(
        [t.get_text() for t in fig.axes[0].get_legend().get_texts()])


def test_kv_viewer_reruns_when_controls_change(tiny_lm):
    from labkit.serve import SamplingParams

    rerun = kv_history(tiny_lm, None, [[5] * 9, [6] * 70], SamplingParams(temperature=0, max_tokens=4,
                                                                                  ignore_eos=True), max_model_len=96)
    viewer = serve_figures.KVCacheViewer(cols=10, rerun=rerun, block_size=4, num_blocks=30)
    first = viewer.history[0]["block_size"]
    viewer.block_size.value = 8
    assert first == 4 and viewer.history[0]["block_size"] == 8 and viewer.step.value == 0
    before = viewer.history
    viewer.num_blocks.value = 8  # 8 blocks of 8 cannot hold max_model_len=96: reported, not raised
    assert viewer.reload() == [] and viewer.history is before
    viewer.num_blocks.value = 30
    assert viewer.reload() and viewer.history is not before and viewer.history[0]["num_blocks"] == 30


def test_bytes_come_from_a_real_packed_layer_where_one_exists(weight):
    from labkit.quant.layers import NF4Linear

    s = quant_stats(weight, "nf4", 4, 64, double_quant=True)
    assert s["bytes_source"] == "packed NF4Linear"
    lin = torch.nn.Linear(200, 64, bias=False)
    lin.weight.data = weight
    assert s["bytes"] == NF4Linear.from_linear(lin, 64, True).quantized_bytes()
    assert s["bytes"] < quant_stats(weight, "nf4", 4, 64)["bytes"]  # double quant saves constants
    assert quant_stats(weight, "asymmetric", 3, 64)["bytes_source"].startswith("formula")


def test_minmax_scheme_recovers_weights_that_sit_on_its_grid():
    from labkit.quant import primitives as prim

    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    on_grid = prim.fake_quantize(w, 4, scheme="minmax", group_size=32)  # like SmolLM2's Q4_1-born weights
    assert quant_stats(on_grid, "minmax", 4, 32)["sqnr_db"] > 80
    assert quant_stats(on_grid, "asymmetric", 4, 32)["sqnr_db"] < 40


def test_explorer_switches_models_and_toggles_double_quant(tiny_lm):
    from torch import nn

    other = nn.Sequential(nn.Linear(64, 32))
    ex = quant_figures.QuantExplorer({"tiny": tiny_lm, "other": other})
    ex.model.value = "other"
    assert list(ex.layer.options) == ["0"]
    ex.scheme.value = "nf4"
    plain = ex.update()["bytes"]
    ex.double_quant.value = True
    assert ex.update()["bytes"] < plain


def test_temperature_explorer_softens_and_reads_the_sweep():
    from labkit.results import Record
    from labkit.zoo import DigitsCNN

    rec = Record("distillation")
    for t, acc in ((1, 0.85), (4, 0.93)):
        rec.add(f"student-kd-T{t}", accuracy=acc, accuracy_std=0.01)
    torch.manual_seed(0)
    ex = distill_figures.TemperatureExplorer(DigitsCNN().eval(), torch.rand(5, 1, 8, 8), torch.arange(5), rec)
    ex.temperature.value = 1
    cold = ex.update()
    ex.temperature.value = 8
    hot = ex.update()
    assert hot["entropy_bits"] > cold["entropy_bits"]
    assert cold["nearest_temperature"] == 1 and hot["nearest_temperature"] == 4 and hot["kd_accuracy"] == 0.93


def _sweep():
    rows = []
    for method in ("global", "layer", "structured"):
        for s in (0.0, 0.5, 0.9):
            rows.append(
                {
                    "method": method,
                    "sparsity": s,
                    "accuracy": 0.97 - s * (0.5 if method == "structured" else 0.2),
                    "params": int(21546 * (1 - s if method == "structured" else 1)),
                    "nonzero_weights": 1,
                    "weight_bytes": 86184,
                    "latency_ms_median": 2.0 * (1 - s / 2 if method == "structured" else 1),
                }
            )
    return rows


def test_sparsity_explorer_moves_with_its_controls():
    from labkit.zoo import DigitsCNN

    ex = prune_figures.SparsityExplorer(DigitsCNN(), _sweep())
    ex.method.value = "structured"
    ex.sparsity.value = 0.9
    row = ex.update()
    assert row["method"] == "structured" and row["sparsity"] == 0.9 and row["params"] == int(21546 * 0.1)
    ex.method.value = "global"
    assert ex.update()["params"] == 21546


def test_histogram_shades_exactly_the_pruned_weights():
    from labkit.prune.figures import weight_histogram

    w = torch.arange(-50, 50).float()
    fig = weight_histogram(w, 0.5)
    label = fig.axes[0].get_legend().get_texts()[0].get_text()
    assert "|w| ≤ 25" in label and "50%" in label


def test_tradeoff_explorer_choice_moves_with_the_threshold():
    r = Record("pruning")
    r.add("dense", model="m", weight_bytes=100.0, accuracy=0.975, latency_ms_median=2.0)
    r.add(
        "small", model="m", weight_bytes=40.0, accuracy=0.970, latency_ms_median=1.5, recipe=["prune 40%", "fine-tune"]
    )
    r.add("tiny", model="m", weight_bytes=10.0, accuracy=0.60, latency_ms_median=1.4)
    rows = [{**v, "experiment": "pruning", "hardware": "here"} for v in r.variants]
    ex = capstone_figures.TradeoffExplorer(rows)
    ex.within.value = 0.01
    info = ex.update()
    assert info["choice"] == "small" and info["recipe"] == ["prune 40%", "fine-tune"]
    assert info["front"] == ["tiny", "small", "dense"]
    ex.within.value = 0.5
    assert ex.update()["choice"] == "tiny"
    ex.cost.value = "latency_ms_median"
    ex.within.value = 0.001
    assert ex.update()["choice"] == "dense"


def test_fusion_explorer_times_both_paths_and_compiles_each_shape_once(monkeypatch):
    from labkit.export import experiment_tensorrt as trt_exp

    compiled = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(kw) or real(fn, backend="eager", **kw))
    monkeypatch.setattr(trt_exp, "_FUSED", {})
    viewer = export_figures.FusionExplorer(options=(8, 16), value=8)
    lat = viewer.update()
    assert set(lat) == {"eager", "fused"} and all(v["latency_ms_median"] > 0 for v in lat.values())
    viewer.rows.value = 16
    viewer.rows.value = 8
    assert len(compiled) == 2  # 8 and 16 once each, not once per move
    fig = export_figures.fusion_figure(lat, 8)
    assert "8 x 1536" in fig.axes[0].get_title()
    with pytest.raises(ValueError, match="rows=0"):
        trt_exp.bias_gelu_timing(0)


def test_an_explorer_is_its_controls_and_update():
    """Explorer.layout/watch/show carry the wiring: a subclass only builds controls and draws."""
    import ipywidgets as W

    class Square(widgets.Explorer):
        def __init__(self):
            self.x = W.IntSlider(value=2)
            self.layout(self.x)
            self.watch(self.x)
            self.drawn = []

        def update(self):
            self.drawn.append(self.x.value ** 2)
            self.show(f"{self.x.value} squared is {self.drawn[-1]}")
            return {"square": self.drawn[-1]}

    e = Square()
    assert e.box.children[-1] is e.out
    e.x.value = 3
    e.x.value = 4
    assert e.drawn == [9, 16]
    assert e.update() == {"square": 16}
