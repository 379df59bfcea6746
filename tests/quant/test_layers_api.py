import pytest
import torch
from torch import nn

from labkit import LabkitError
from labkit.measure import param_count, weight_bytes
from labkit.quant import DtypeConfig, Int4Config, Int8Config, NF4Config, quantize_
from labkit.quant import primitives as P
from labkit.quant.api import bits_per_param_quantized
from labkit.quant.layers import Int4Linear, Int8Linear, NF4Linear

torch.manual_seed(0)
LIN = nn.Linear(576, 96)  # 576 = 4.5 groups of 128: the last group is padded


@pytest.mark.parametrize("make,floor,bits", [
    (lambda: Int8Linear.from_linear(LIN, compute_dtype=None), 38, 8 + 32 / 576),  # fused, fp32 all through
    (lambda: Int8Linear.from_linear(LIN, "dequantize"), 38, 8 + 32 / 576),
    (lambda: Int4Linear.from_linear(LIN, 128, kernel="dequantize"), 17, (4 + 24 / 128) * 640 / 576),
    (lambda: Int4Linear.from_linear(LIN, 64, symmetric=True, kernel="dequantize"), 16, 4 + 16 / 64),
    (lambda: Int4Linear.from_linear(LIN, 128, compute_dtype=None), 17, (4 + 32 / 128) * 640 / 576),  # fp16 s + z
    (lambda: Int4Linear.from_linear(LIN, 64, symmetric=True, compute_dtype=None), 16, 4 + 32 / 64),
    (lambda: NF4Linear.from_linear(LIN, 64, double_quant=False), 19, 4.5),
    (lambda: NF4Linear.from_linear(LIN, 64, double_quant=True), 19, 4 + 8 / 64 + (32 * 4 + 32) / (96 * 576)),
])
def test_layer_stores_packed_bits_and_matches_float(make, floor, bits):
    layer = make()
    w = layer.dequantize()
    assert w.shape == LIN.weight.shape
    assert P.sqnr(LIN.weight, w) >= floor
    assert layer.bits_per_weight() == pytest.approx(bits, rel=1e-6)
    x = torch.randn(2, 5, 576)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, w, LIN.bias))
    assert weight_bytes(layer) == layer.quantized_bytes() + 96 * 4  # + fp32 bias


def test_quantize_model_reports_and_shrinks(tiny_lm):
    before = weight_bytes(tiny_lm)
    n_params = param_count(tiny_lm)
    report = quantize_(tiny_lm, NF4Config())
    assert len(report.quantized) == 2 * 7
    assert "model.embed_tokens" in report.skipped and "lm_head" in report.skipped
    assert "embedding" in report.skipped["model.embed_tokens"]
    assert weight_bytes(tiny_lm) < before
    assert param_count(tiny_lm) == n_params  # logical weights, not packed bytes
    assert bits_per_param_quantized(tiny_lm) < 4.2
    out = tiny_lm(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(out).all()


def test_int8_model_agrees_with_fp32(tiny_lm):
    from copy import deepcopy

    ids = torch.randint(0, 1000, (1, 16))
    ref = tiny_lm(input_ids=ids).logits
    q = deepcopy(tiny_lm)
    quantize_(q, Int8Config())
    assert P.sqnr(ref, q(input_ids=ids).logits) > 30


def test_dtype_config_halves_bytes(tiny_lm):
    before = weight_bytes(tiny_lm)
    report = quantize_(tiny_lm, DtypeConfig(torch.bfloat16), skip=())
    assert weight_bytes(tiny_lm) == pytest.approx(before / 2, rel=0.01)
    n_linear = sum(isinstance(m, nn.Linear) for m in tiny_lm.modules())
    assert len(report.quantized) == n_linear and not report.skipped


def test_dtype_config_honours_skip_and_still_runs(tiny_lm):
    ids = torch.tensor([[5, 6, 7, 8]])
    ref = tiny_lm(input_ids=ids).logits
    report = quantize_(tiny_lm, DtypeConfig(torch.bfloat16))  # default skip: lm_head (tied to the embedding)
    assert "lm_head" in report.skipped and "lm_head" not in report.quantized
    assert tiny_lm.lm_head.weight.dtype == torch.float32 == tiny_lm.model.embed_tokens.weight.dtype
    assert tiny_lm.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    out = tiny_lm(input_ids=ids).logits  # mixed precision runs: bf16 body, fp32 head
    assert out.dtype == torch.float32 and torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), 0) > 0.99


def test_filter_fn_selecting_an_embedding_is_an_error(tiny_lm):
    with pytest.raises(ValueError, match="nn.Embedding"):
        quantize_(tiny_lm, Int8Config(), filter_fn=lambda m, n: "embed" in n)


def test_selecting_a_non_linear_layer_is_an_error():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Linear(4, 4))
    with pytest.raises(LabkitError, match="only nn.Linear"):
        quantize_(model, Int8Config(), filter_fn=lambda m, n: n == "0")


def test_conv_layers_are_reported_as_skipped():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(4, 4))
    report = quantize_(model, Int4Config(group_size=2))
    assert report.quantized == ["2"] and "not nn.Linear" in report.skipped["0"]


def test_nothing_selected_is_an_error():
    with pytest.raises(LabkitError, match="no nn.Linear"):
        quantize_(nn.Sequential(nn.ReLU()), Int8Config())


def test_bad_configs_named():
    with pytest.raises(LabkitError, match="group_size=0"):
        Int4Config(group_size=0)
    with pytest.raises(LabkitError, match="group_size=None"):
        NF4Config(group_size=None)
    with pytest.raises(LabkitError, match="dtype"):
        DtypeConfig(torch.int8)
    with pytest.raises(LabkitError, match="not a quantization config"):
        quantize_(nn.Linear(2, 2), "int4")


def test_rtn_int4_codes_use_the_fp16_scales_it_stores():
    from labkit.quant import primitives as prim

    lin = nn.Linear(256, 32)
    torch.nn.init.normal_(lin.weight, std=0.07)
    layer = Int4Linear.from_linear(lin, 64, kernel="dequantize")
    codes = prim.unpack_int4(layer.qweight).view(-1, 64).float()
    scale, zero = layer.scale.float().view(-1, 1), layer.zero.float().view(-1, 1)
    groups = lin.weight.detach().reshape(-1, 64)
    assert torch.equal(codes, torch.clamp(torch.round(groups / scale) + zero, 0, 15))  # with the stored scale


def test_gptq_checks_every_layer_before_swapping_any():
    from labkit.quant.gptq import gptq_quantize_

    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 48), nn.Linear(48, 8))
    with pytest.raises(ValueError, match=r"group_size=64 must divide in_features=48 of layer '2'"):
        gptq_quantize_(model, torch.randn(2, 64), group_size=64, skip=(), progress=False)
    assert all(isinstance(m, nn.Linear) for m in model)  # nothing half-quantized


@pytest.mark.parametrize(
    "shape,dtype",
    [((100, 37), torch.float32), ((3, 130), torch.bfloat16), ((1, 50), torch.float32), ((64, 128), torch.float32)],
)
def test_flat_nf4_layout_matches_bitsandbytes_on_any_shape(shape, dtype):
    bnbF = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    lin = nn.Linear(shape[1], shape[0], bias=False)
    lin.weight.data = lin.weight.data.to(dtype)
    packed, state = bnbF.quantize_4bit(lin.weight.data, blocksize=64, quant_type="nf4")
    theirs = bnbF.dequantize_4bit(packed, state).float()
    flat = NF4Linear.from_linear(lin, 64, double_quant=False, layout="flat").dequantize()
    absmax = lin.weight.float().abs().max()
    tol = (1e-5 if dtype == torch.float32 else 2**-8) * absmax  # bitsandbytes hands bf16 weights back in bf16
    assert (flat - theirs).abs().max() <= tol
    row = NF4Linear.from_linear(lin, 64, double_quant=False).dequantize()
    if shape[1] % 64 and shape[0] > 1:  # blocks straddle rows in bitsandbytes' layout, never in labkit's rows
        assert (row - theirs).abs().max() > 1e-2 * absmax
    else:
        assert (row - theirs).abs().max() <= tol


def test_nf4_layout_is_validated():
    with pytest.raises(ValueError, match="layout='blocky'"):
        NF4Config(layout="blocky")


def test_a_new_quantization_config_registers_its_layer_builder():
    """A new method is a config dataclass and one registered builder: quantize_ dispatches on it unchanged."""
    from dataclasses import dataclass

    from labkit.quant import api
    from labkit.quant.layers import Int8Linear

    @dataclass(frozen=True)
    class ShiftedInt8Config:  # a made-up method: int8 codes of (w + 0.0)
        pass

    built = []

    @api.register_layer(ShiftedInt8Config)
    def _build(linear, config):
        built.append(linear.out_features)
        return Int8Linear.from_linear(linear)

    try:
        model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4))
        report = api.quantize_(model, ShiftedInt8Config(), skip=())
        assert report.quantized == ["0", "1"] and built == [8, 4]
        assert isinstance(model[0], Int8Linear)
    finally:
        api._LAYER_BUILDERS.pop(ShiftedInt8Config)
    with pytest.raises(ValueError, match="use one of Int8Config, Int4Config, NF4Config, DtypeConfig"):
        api.quantize_(torch.nn.Sequential(torch.nn.Linear(4, 4)), ShiftedInt8Config())


@pytest.mark.parametrize("config", [Int8Config(), Int4Config(group_size=32), NF4Config(group_size=32)])
def test_quantize_leaves_the_callers_layers_untouched(config):
    """quantize_ replaces layers in the model; a bf16 layer the caller still holds keeps its dtype and values."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).to(torch.bfloat16)
    held = model[0]
    before = held.weight.detach().clone()
    quantize_(model, config, skip=())
    assert model[0] is not held and held.weight.dtype == torch.bfloat16 and torch.equal(held.weight, before)
    assert model(torch.randn(2, 64, dtype=torch.bfloat16)).shape == (2, 32)
