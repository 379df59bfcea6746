"""The fused CPU kernels agree with the readable dequantize-then-matmul path, and fall back where they cannot run."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from labkit.quant import Int4Config, Int8Config, kernels, quantize_
from labkit.quant import primitives as P
from labkit.quant.layers import Int4Linear, Int8Linear


def _bf16_close(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> None:
    """``out`` is ``x @ w.T + bias`` with ``x`` and the result rounded to bf16: within 1 % of ``|x| @ |w|.T``."""
    ref = x.bfloat16().float() @ w.T + bias
    assert ((out - ref).abs() <= 0.01 * (x.abs() @ w.abs().T) + 1e-3 * bias.abs() + 1e-6).all()


def _linear(i: int, o: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(i, o)


@settings(max_examples=20, deadline=None)
@given(i=st.integers(1, 40).map(lambda k: 8 * k), o=st.integers(1, 12).map(lambda k: 16 * k),
       rows=st.integers(1, 9), group=st.sampled_from([32, 64, 128]), symmetric=st.booleans())
def test_fused_int4_matches_the_readable_path(i, o, rows, group, symmetric):
    lin = _linear(i, o)
    fused = Int4Linear.from_linear(lin, group, symmetric)
    readable = Int4Linear.from_linear(lin, group, symmetric, kernel="dequantize")
    assert fused.kernel == "fused" and readable.kernel == "dequantize"
    assert fused.qweight.numel() == readable.qweight.numel()  # the same packed bytes, another layout
    # the weight read back through the kernel is the readable weight (fp16 zero points: within 0.5 % of a step)
    w = readable.dequantize()
    step = readable.scale.float().max()
    assert (fused.dequantize() - w).abs().max() <= 0.005 * step
    x = torch.randn(rows, i)
    _bf16_close(fused(x), x, readable.dequantize(), lin.bias)  # bf16 activations inside the kernel
    exact = Int4Linear.from_linear(lin, group, symmetric, compute_dtype=None)  # fp32 all through
    # fp32 through the kernel is x @ the weight the kernel holds (its fp16 zero points are checked against the
    # readable weight above; readable(x) differs from it by that rounding, up to 0.5 % of a step per weight)
    torch.testing.assert_close(exact(x), nn.functional.linear(x, exact.dequantize(), lin.bias), rtol=1e-4, atol=1e-4)


@settings(max_examples=20, deadline=None)
@given(i=st.integers(1, 20).map(lambda k: 16 * k), o=st.integers(1, 300), rows=st.integers(1, 9))
def test_fused_int8_matches_the_readable_path(i, o, rows):
    lin = _linear(i, o)
    fused, readable = Int8Linear.from_linear(lin), Int8Linear.from_linear(lin, "dequantize")
    exact = Int8Linear.from_linear(lin, compute_dtype=None)
    assert torch.equal(fused.qweight, readable.qweight)  # one layout for both
    x = torch.randn(rows, i)
    out = fused(x)
    assert out.dtype == torch.float32
    _bf16_close(out, x, readable.dequantize(), lin.bias)
    torch.testing.assert_close(exact(x), readable(x), rtol=1e-4, atol=1e-4)


def test_bf16_inputs_take_the_kernels():
    lin = _linear(576, 192)
    x = torch.randn(3, 576, dtype=torch.bfloat16)
    for fused, readable in ((Int8Linear.from_linear(lin), Int8Linear.from_linear(lin, "dequantize")),
                            (Int4Linear.from_linear(lin, 64), Int4Linear.from_linear(lin, 64, kernel="dequantize"))):
        out = fused(x)
        assert out.dtype == torch.bfloat16
        assert P.sqnr(readable(x).float(), out.float()) > 40


def test_a_shape_the_kernel_cannot_take_falls_back_and_says_so_once():
    lin = _linear(64, 24)  # 24 output rows: the CPU int4 kernel wants a multiple of 16
    kernels._said.clear()
    with pytest.warns(UserWarning, match=r"Int4Linear: using dequantize-then-matmul .*out_features divisible by 16"):
        layer = Int4Linear.from_linear(lin, 32)
    assert layer.kernel == "dequantize" and hasattr(layer, "scale")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same reason again: silent
        again = Int4Linear.from_linear(lin, 32)
    x = torch.randn(2, 64)
    torch.testing.assert_close(again(x), nn.functional.linear(x, again.dequantize(), lin.bias))


def test_a_width_the_int8_kernel_cannot_take_falls_back():
    layer = Int8Linear.from_linear(_linear(40, 8))  # 40 columns: torch's bf16 kernel needs a multiple of 16
    kernels._said.clear()
    x = torch.randn(3, 40)
    with pytest.warns(UserWarning, match="in_features divisible by 16, not 40"):
        out = layer(x)
    torch.testing.assert_close(out, nn.functional.linear(x, layer.dequantize(), layer.bias))


def test_an_input_the_int8_kernel_cannot_take_falls_back():
    lin = _linear(32, 16).double()
    layer = Int8Linear.from_linear(lin.float())
    kernels._said.clear()
    x = torch.randn(2, 32, dtype=torch.float64)
    with pytest.warns(UserWarning, match="int8 kernel takes fp32/bf16/fp16"):
        out = layer(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, nn.functional.linear(x, layer.dequantize().double(), layer.bias.double()))


def test_kernel_names_are_checked():
    with pytest.raises(ValueError, match=r"compute_dtype=torch.int8 is not allowed"):
        Int8Config(compute_dtype=torch.int8)
    with pytest.raises(ValueError, match=r"kernel='marlin' is not allowed; use one of 'fused', 'dequantize'"):
        Int4Config(kernel="marlin")
    with pytest.raises(ValueError, match="kernel='fast'"):
        Int8Config(kernel="fast")
    with pytest.raises(ValueError, match="kernel='x'"):
        Int8Linear.from_linear(_linear(8, 8), "x")


def test_quantize_uses_the_kernels_by_default(tiny_lm):
    from copy import deepcopy

    ids = torch.tensor([[1, 5, 9, 2]])
    outs = {}
    for kernel in ("fused", "dequantize"):
        model = deepcopy(tiny_lm)
        quantize_(model, Int8Config(kernel=kernel, compute_dtype=None))
        assert {m.kernel for m in model.modules() if isinstance(m, Int8Linear)} == {kernel}
        with torch.no_grad():
            outs[kernel] = model(input_ids=ids).logits
    torch.testing.assert_close(outs["fused"], outs["dequantize"], rtol=1e-4, atol=1e-4)


def test_int8_agrees_with_torchao_int8_weight_only():
    """torchao's Int8WeightOnlyConfig, the production library, on the same weights: its scale is absmax / 127.5 where
    labkit's is absmax / 127, so codes differ by at most one step and the layers' outputs agree closely."""
    pytest.importorskip("torchao", reason="torchao is not installed (pip install torchao; not a labkit dependency)")
    from torchao.quantization import Int8WeightOnlyConfig
    from torchao.quantization import quantize_ as torchao_quantize_

    lin = _linear(576, 192)
    theirs = nn.Sequential(nn.Linear(576, 192))
    theirs[0].load_state_dict(lin.state_dict())
    torchao_quantize_(theirs, Int8WeightOnlyConfig())
    ours = Int8Linear.from_linear(lin, compute_dtype=None)
    assert (theirs[0].weight.qdata.int() - ours.qweight.int()).abs().max() <= 1
    x = torch.randn(4, 576)
    with torch.no_grad():
        assert P.sqnr(theirs(x), ours(x)) > 35


@pytest.mark.parametrize("symmetric", [False, True])
def test_an_int4_layer_chooses_its_layout_again_when_it_moves(symmetric):
    """The fused layout is the CPU kernel's own: leaving the CPU, the layer goes back to the readable layout with
    the very codes and scales it was built from; back on the CPU it takes the fused layout again."""
    from labkit.quant.layers import Int4Linear

    torch.manual_seed(0)
    linear = nn.Linear(256, 32)
    fused = Int4Linear.from_linear(linear, 128, symmetric=symmetric, kernel="fused")
    readable = Int4Linear.from_linear(linear, 128, symmetric=symmetric, kernel="dequantize")
    assert fused.kernel == "fused" and readable.kernel == "dequantize"
    packed = fused.qweight.clone()
    x = torch.randn(3, 256)
    before = fused(x)
    fused._to_readable()  # what a move off the CPU does first
    assert fused.kernel == "dequantize" and "scale_and_zero" not in dict(fused.named_buffers())
    for name, buf in readable.named_buffers():
        assert torch.equal(dict(fused.named_buffers())[name], buf), name
    fused.to("cpu")  # arriving on a CPU: the fused layout again, bit for bit
    assert fused.kernel == "fused" and torch.equal(fused.qweight, packed)
    torch.testing.assert_close(fused(x), before)
    fused.to("meta")  # any non-CPU device takes the readable layout
    assert fused.kernel == "dequantize" and fused.qweight.device.type == "meta"


@pytest.mark.gpu
def test_an_int4_layer_built_on_the_cpu_runs_on_cuda():
    from labkit.quant.layers import Int4Linear

    linear = nn.Linear(256, 32)
    layer = Int4Linear.from_linear(linear, 128, kernel="fused").to("cuda")
    x = torch.randn(3, 256)
    torch.testing.assert_close(layer(x.cuda()).cpu(), Int4Linear.from_linear(linear, 128, kernel="dequantize")(x),
                               atol=1e-2, rtol=1e-2)


@settings(max_examples=15, deadline=None)
@given(i=st.integers(1, 24).map(lambda k: 16 * k), o=st.integers(1, 12).map(lambda k: 16 * k),
       rows=st.integers(1, 4), group=st.sampled_from([32, 64, 128]), bias=st.booleans())
def test_direct_is_the_module_bit_for_bit(i, o, rows, group, bias):
    """``direct(bf16)``: the fused product as one plain function (what the static decoder calls) equals the module's
    output exactly, padded groups and bias included; None where the fused kernel would not take the input."""
    torch.manual_seed(0)
    lin = nn.Linear(i, o, bias=bias)
    x = torch.randn(1, rows, i).bfloat16()
    for layer in (Int8Linear.from_linear(lin), Int4Linear.from_linear(lin, group, True)):
        fn = layer.direct(torch.bfloat16)
        assert fn is not None and torch.equal(fn(x), layer(x))
        assert layer.direct(torch.float32) is None  # not its compute dtype: the module casts, direct does not
    assert Int8Linear.from_linear(lin, "dequantize").direct(torch.bfloat16) is None
    assert Int4Linear.from_linear(lin, group, True, kernel="dequantize").direct(torch.bfloat16) is None
    odd = Int8Linear.from_linear(nn.Linear(24, o))  # in_features not a multiple of 16: no fused int8 kernel
    assert odd.direct(torch.bfloat16) is None
