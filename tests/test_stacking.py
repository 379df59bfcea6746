"""Stacked projections compute what the separate ones compute; the kernels' cached constants follow the weights."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from labkit.decode import StaticDecoder
from labkit.quant import api
from labkit.quant.layers import Int4Linear, Int8Linear
from labkit.stacking import concat_rows
from tests.conftest import tiny_llama


def _parts(outs, bias, build, seed=0):
    torch.manual_seed(seed)
    return [build(nn.Linear(128, o, bias=bias)) for o in outs]


BUILDERS = {"fp32": lambda lin: lin.requires_grad_(False), "int8": Int8Linear.from_linear,
            "int4": lambda lin: Int4Linear.from_linear(lin, group_size=32)}


@settings(max_examples=12, deadline=None)
@given(kind=st.sampled_from(sorted(BUILDERS)), blocks=st.lists(st.integers(1, 3), min_size=2, max_size=3),
       last=st.integers(1, 4), bias=st.booleans(), rows=st.integers(1, 5))
def test_stacked_layer_equals_its_parts(kind, blocks, last, bias, rows):
    """Any stack whose parts but the last have a multiple of 64 rows: the same outputs, bit for bit for the
    quantized kernels (each output row is computed alone), to float rounding for fp32."""
    outs = [Int4Linear.ROW_BLOCK * b for b in blocks] + [16 * last]
    mods = _parts(outs, bias, BUILDERS[kind])
    x = torch.randn(rows, 128)
    one = concat_rows(mods)
    assert type(one) is type(mods[0]) and one.out_features == sum(outs)
    with torch.no_grad():
        got, want = one(x), torch.cat([m(x) for m in mods], -1)
    if kind == "fp32":
        assert torch.allclose(got, want, atol=1e-6)
    else:
        assert torch.equal(got, want)


def test_torch_int4_layout_packs_rows_in_blocks_of_64():
    """The property concat_rows relies on (it would fail, not silently mis-stack, if torch changed it)."""
    pack = lambda t: torch._convert_weight_to_int4pack_for_cpu(t, 2)  # noqa: E731
    a, b = (torch.randint(0, 16, (n, 128), dtype=torch.int32) for n in (Int4Linear.ROW_BLOCK, 48))
    assert torch.equal(torch.cat([pack(a), pack(b)]), pack(torch.cat([a, b])))
    a = torch.randint(0, 16, (32, 128), dtype=torch.int32)
    assert not torch.equal(torch.cat([pack(a), pack(b)]), pack(torch.cat([a, b])))


def test_what_cannot_be_stacked_is_refused():
    lin = nn.Linear(128, 64)
    assert concat_rows([Int4Linear.from_linear(nn.Linear(128, 32), 32), Int4Linear.from_linear(lin, 32)]) is None
    assert concat_rows([lin, Int8Linear.from_linear(lin)]) is None  # different types
    assert concat_rows([lin, nn.Linear(128, 64, bias=False)]) is None  # bias on one only
    assert concat_rows([lin, nn.Linear(96, 64)]) is None  # different inputs
    assert concat_rows([lin, nn.Linear(128, 64).bfloat16()]) is None  # different dtypes
    readable = [Int4Linear.from_linear(lin, 32, kernel="dequantize")] * 2
    assert concat_rows(readable) is None  # only the kernel's layout is stacked


@pytest.mark.parametrize("build", [Int8Linear.from_linear, lambda lin: Int4Linear.from_linear(lin, 32)],
                         ids=["int8", "int4"])
def test_kernel_constants_are_cast_once_and_follow_the_weights(build):
    """The bf16 scales are made once; a load_state_dict (in place) or a replaced buffer makes them again."""
    torch.manual_seed(0)
    layer, other = build(nn.Linear(128, 64)), build(nn.Linear(128, 64))
    name = "scale" if isinstance(layer, Int8Linear) else "scale_and_zero"
    x = torch.randn(2, 128)
    first = layer.kernel_constant(name, torch.bfloat16)
    assert layer.kernel_constant(name, torch.bfloat16) is first and first.dtype == torch.bfloat16
    layer.load_state_dict(other.state_dict())
    assert torch.equal(layer(x), other(x))
    setattr(layer, name, getattr(other, name).clone() * 2)
    assert torch.equal(layer.kernel_constant(name, torch.bfloat16), (getattr(other, name) * 2).bfloat16())


@pytest.mark.parametrize("config", [None, api.Int8Config()], ids=["fp32", "int8"])
def test_decoder_stacks_qkv_and_gate_up(config):
    """Every layer's q/k/v and gate/up become one matmul each, and the logits do not move."""
    model = tiny_llama(seed=2)
    if config:
        api.quantize_(model, config)
    ids = torch.randint(3, 1000, (1, 10), generator=torch.Generator().manual_seed(0))
    fused, plain = StaticDecoder(model, max_len=16), StaticDecoder(model, max_len=16, fuse=False)
    assert fused.fused_groups == 2 * len(model.model.layers) and plain.fused_groups == 0
    assert torch.allclose(fused.forward(ids), plain.forward(ids), atol=1e-5)
