import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from labkit import LabkitError
from labkit.quant import primitives as P

torch.manual_seed(0)
W = torch.randn(96, 200)  # 200 is not a multiple of 64 or 128: last group padded


@given(st.lists(st.integers(0, 15), min_size=0, max_size=64).filter(lambda x: len(x) % 2 == 0))
def test_pack_unpack_roundtrip(codes):
    c = torch.tensor(codes, dtype=torch.uint8)
    packed = P.pack_int4(c)
    assert packed.numel() == len(codes) // 2 and packed.dtype == torch.uint8
    assert torch.equal(P.unpack_int4(packed), c)


def test_pack_rejects_odd_count():
    with pytest.raises(LabkitError, match="even number"):
        P.pack_int4(torch.zeros(3, dtype=torch.uint8))


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([4, 8]), rows=st.integers(1, 8), cols=st.integers(1, 70), seed=st.integers(0, 99))
def test_symmetric_roundtrip_error_within_half_step(bits, rows, cols, seed):
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    q, scale = P.quantize_symmetric(x, bits)
    assert q.abs().max() <= 2 ** (bits - 1) - 1
    assert ((P.dequantize_symmetric(q, scale) - x).abs() <= scale / 2 + 1e-6).all()


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([4, 8]), cols=st.integers(2, 70), seed=st.integers(0, 99), shift=st.floats(-3, 3))
def test_asymmetric_roundtrip_and_exact_zero(bits, cols, seed, shift):
    x = torch.randn(4, cols, generator=torch.Generator().manual_seed(seed)) + shift
    x[:, 0] = 0.0
    q, scale, zero = P.quantize_asymmetric(x, bits)
    assert int(q.max()) <= 2**bits - 1
    deq = P.dequantize_asymmetric(q, scale, zero)
    assert ((deq - x).abs() <= scale / 2 + 1e-5).all()
    assert (deq[:, 0] == 0).all()  # zero is exactly representable


@pytest.mark.parametrize("scheme,bits,group,floor", [
    ("symmetric", 8, None, 38.0), ("asymmetric", 8, None, 38.0),
    ("symmetric", 4, 64, 17.0), ("asymmetric", 4, 64, 18.0), ("asymmetric", 4, 128, 17.5),
    ("nf4", 4, 64, 20.0),
])
def test_sqnr_floors_on_gaussian_weights(scheme, bits, group, floor):
    assert P.sqnr(W, P.fake_quantize(W, bits, scheme=scheme, group_size=group)) >= floor


def test_finer_groups_are_better_and_per_tensor_worst():
    w = W.clone()
    w[3, 7] = 40.0  # one outlier
    per_tensor = P.sqnr(w, P.fake_quantize(w, 4, per_tensor=True))
    per_channel = P.sqnr(w, P.fake_quantize(w, 4))
    per_group = P.sqnr(w, P.fake_quantize(w, 4, group_size=32))
    assert per_tensor < per_channel < per_group


def test_nf4_code_matches_qlora_table():
    # bitsandbytes' hard-coded NF4 table (QLoRA appendix E)
    table = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]
    assert torch.allclose(P.NF4_CODE, torch.tensor(table), atol=2e-4)
    assert len(P.NF4_CODE) == 16 and (P.NF4_CODE == 0).sum() == 1


def test_nf4_matches_bitsandbytes_cpu():
    F = pytest.importorskip("bitsandbytes.functional")
    x = torch.randn(300, 64, generator=torch.Generator().manual_seed(1))
    packed, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4")
    theirs = F.dequantize_4bit(packed, state)
    codes, absmax = P.quantize_nf4(x, 64)
    ours = P.dequantize_nf4(codes, absmax).view_as(x)
    assert (ours - theirs).abs().max() <= 1e-5 * x.abs().max()
    assert torch.equal(absmax, state.absmax.float())


def test_double_quant_is_close_and_small():
    absmax = torch.rand(1000) * 0.2 + 0.05
    q, scale, offset = P.double_quantize(absmax, 256)
    back = P.double_dequantize(q, scale, offset, 256)
    assert q.dtype == torch.int8 and scale.numel() == math.ceil(1000 / 256)
    assert (back - absmax).abs().max() <= scale.max() / 2 + 1e-7


def test_sqnr_identical_is_inf():
    assert P.sqnr(W, W) == math.inf


@pytest.mark.parametrize("bad", [0, -4, 3, 7.5])
def test_bad_group_size_named(bad):
    with pytest.raises(LabkitError, match=f"group_size={bad!r}"):
        P.check_group_size(bad)


def test_bad_bits_named():
    with pytest.raises(LabkitError, match="bits=5"):
        P.quantize_symmetric(W, 5)
