"""LLM.int8's split, SmoothQuant and AWQ: the exact identities, each beating its naive counterpart where
activations have outlier channels, and LLM.int8 against bitsandbytes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from labkit import LabkitError
from labkit.quant import activation_aware as aa
from labkit.quant.primitives import fake_quantize, sqnr

OUTLIERS = [3, 77, 200]


def _inputs(seed=0, tokens=64, features=256, out=128, scale=40.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, features, generator=g)
    x[:, OUTLIERS] *= scale  # a few hidden-state features far above the rest, as LLM.int8 found in every LLM
    w = torch.randn(out, features, generator=g) * 0.05
    return x, w, x @ w.T


def test_the_outliers_are_found():
    x, _, _ = _inputs()
    assert aa.outlier_columns(x).nonzero().flatten().tolist() == OUTLIERS


def test_llm_int8_split_beats_plain_int8_and_is_exact_at_the_extremes():
    x, w, ref = _inputs()
    plain, split = sqnr(ref, aa.int8_matmul(x, w)), sqnr(ref, aa.int8_decomposed_matmul(x, w))
    assert split > plain + 10, (plain, split)
    assert torch.equal(aa.int8_decomposed_matmul(x, w, threshold=1e9), aa.int8_matmul(x, w))
    assert torch.allclose(aa.int8_decomposed_matmul(x, w, threshold=1e-9), ref, atol=1e-4)


def _bnb_int8(w, threshold, device):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    layer = bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=False, has_fp16_weights=False, threshold=threshold)
    layer.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    return layer.to(device)


def test_bitsandbytes_int8_on_the_cpu_is_weight_only():
    """What bitsandbytes' LLM.int8 layer computes on a CPU (0.50): int8 weights dequantized against float inputs,
    the outlier threshold unused, so it matches weight-only int8, not the decomposition (which needs its CUDA
    kernels: the gpu-marked test below)."""
    x, w, ref = _inputs()
    with torch.no_grad():
        got = {t: _bnb_int8(w, t, "cpu")(x).float() for t in (0.0, 6.0)}
    weight_only = x @ fake_quantize(w, 8, scheme="symmetric").T
    assert torch.equal(got[0.0], got[6.0])
    assert sqnr(weight_only, got[6.0]) > 45


@pytest.mark.gpu
def test_llm_int8_split_agrees_with_bitsandbytes_on_cuda():
    x, w, ref = _inputs()
    with torch.no_grad():
        theirs = _bnb_int8(w, 6.0, "cuda")(x.half().cuda()).float().cpu()
    ours = aa.int8_decomposed_matmul(x.half().float(), w.half().float())
    assert sqnr(theirs, ours) > 35 and sqnr(ref, theirs) > sqnr(ref, aa.int8_matmul(x, w)) + 10


def test_smoothing_is_exact_and_makes_w8a8_better():
    x, w, ref = _inputs()
    s = aa.smooth_scales(x.abs().amax(dim=0), w, alpha=0.5)
    assert torch.allclose((x / s) @ (w * s).T, ref, rtol=1e-4, atol=1e-3)
    naive, smooth = sqnr(ref, aa.w8a8_matmul(x, w)), sqnr(ref, aa.w8a8_matmul(x, w, s))
    assert smooth > naive + 6, (naive, smooth)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 50), scale=st.sampled_from([1.0, 10.0, 50.0]))
def test_awq_never_does_worse_than_round_to_nearest(seed, scale):
    x, w, ref = _inputs(seed, scale=scale)
    s, alpha = aa.awq_scales(x, w, bits=4, group_size=64)
    rtn = (x @ fake_quantize(w, 4, scheme="symmetric", group_size=64).T - ref).pow(2).mean()
    awq = (aa.awq_matmul(x, w, s, bits=4, group_size=64) - ref).pow(2).mean()
    assert awq <= rtn * (1 + 1e-5) and 0 <= alpha < 1  # alpha = 0 (no scaling) is on the grid


def test_awq_finds_a_scale_where_activations_have_salient_channels():
    x, w, ref = _inputs(scale=40.0)
    s, alpha = aa.awq_scales(x, w, bits=4, group_size=64)
    rtn = sqnr(ref, x @ fake_quantize(w, 4, scheme="symmetric", group_size=64).T)
    assert alpha > 0 and sqnr(ref, aa.awq_matmul(x, w, s, bits=4, group_size=64)) > rtn + 3
    assert s[OUTLIERS].min() > s.median()  # the salient channels' weights are scaled up


def test_per_tensor_int8_shows_what_one_outlier_costs():
    x, _, _ = _inputs()
    rest = [i for i in range(x.shape[1]) if i not in OUTLIERS]
    assert sqnr(x[:, rest], aa.per_tensor_int8(x)[:, rest]) < sqnr(x[:, rest], aa.per_tensor_int8(x[:, rest])) - 20


def test_bad_input_is_named():
    x, w, _ = _inputs()
    with pytest.raises(LabkitError, match=r"x \(64, 256\) and w \(128, 255\)"):
        aa.int8_matmul(x, w[:, :255])
    with pytest.raises(LabkitError, match="alpha=1.5"):
        aa.smooth_scales(x.abs().amax(0), w, alpha=1.5)
    with pytest.raises(LabkitError, match="one value per input channel"):
        aa.smooth_scales(x.abs().amax(1), w)
    with pytest.raises(LabkitError, match="threshold=0"):
        aa.outlier_columns(x, threshold=0)
    with pytest.raises(LabkitError, match="grid=0"):
        aa.awq_scales(x, w, grid=0)


def test_methods_compared_on_a_models_real_inputs():
    from labkit.viz.plots import lines
    from tests.conftest import tiny_llama

    model = tiny_llama(seed=1)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    ids = torch.randint(3, 1000, (1, 40), generator=torch.Generator().manual_seed(0))
    seen = aa.layer_inputs(model, ids, names)
    assert {n: tuple(x.shape) for n, x in seen.items()} == {names[0]: (40, 64), names[1]: (40, 128)}
    assert not any(model.get_submodule(n)._forward_pre_hooks for n in names)  # hooks removed
    rows = [{"layer": i, "projection": n.split(".")[-1], **aa.compare_methods(seen[n], model.get_submodule(n).weight,
                                                                              group_size=32)}
            for i, n in enumerate(names)]
    assert rows[0]["int4 g32 AWQ"] >= rows[0]["int4 g32 RTN"] - 1e-4 and rows[0]["LLM.int8 split"] > 20
    fig = lines(rows, "layer", ["int4 g32 RTN", "int4 g32 AWQ"], xlabel="layer", ylabel="dB", title="t",
                label="projection")
    assert len(fig.axes) == 2
