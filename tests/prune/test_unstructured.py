"""Unstructured masks: exact global counts, layer-wise counts, masks that save nothing, CSR's break-even."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from labkit import LabkitError, measure, prune
from labkit.zoo import DigitsCNN


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return DigitsCNN()


@settings(max_examples=25, deadline=None)
@given(
    sparsity=st.floats(0, 0.99), sizes=st.lists(st.integers(1, 300), min_size=1, max_size=4), seed=st.integers(0, 99)
)
def test_global_masks_remove_exactly_the_requested_count(sparsity, sizes, seed):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(n, generator=g) * (i + 1) for i, n in enumerate(sizes)]
    total = sum(sizes)
    masks = prune.global_magnitude_masks(ws, sparsity)
    assert sum(int((~m).sum()) for m in masks) == round(sparsity * total)
    kept = torch.cat([w[m].abs() for w, m in zip(ws, masks)])
    dropped = torch.cat([w[~m].abs() for w, m in zip(ws, masks)])
    if len(kept) and len(dropped):
        assert dropped.max() <= kept.min()


def test_ties_still_give_the_exact_count():
    ws = [torch.zeros(10), torch.ones(10)]
    masks = prune.global_magnitude_masks(ws, 0.25)
    assert sum(int((~m).sum()) for m in masks) == 5 and masks[1].all()


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_prune_hits_the_sparsity_and_saves_nothing(scope):
    m = net()
    before = measure.weight_bytes(m)
    report = prune.magnitude_prune(m, 0.5, scope=scope)
    total = report[-1]
    assert total["layer"] == "total" and total["zeros"] == round(0.5 * total["params"])
    if scope == "layer":
        assert all(abs(r["sparsity"] - 0.5) < 0.01 for r in report[:-1])
    # torch.nn.utils.prune keeps weight_orig AND weight_mask: the masked model is *bigger*
    assert measure.weight_bytes(m) > before
    prune.make_permanent(m)
    assert not any(hasattr(mod, "weight_orig") for mod in m.modules())
    assert measure.weight_bytes(m) == before and measure.param_count(m) == measure.param_count(net())
    assert prune.sparsity_report(m)[-1]["zeros"] == total["zeros"]
    assert m(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_global_prunes_small_scale_layers_harder():
    m = net()
    with torch.no_grad():
        m.features[0].weight.mul_(0.01)
    rows = {r["layer"]: r["sparsity"] for r in prune.magnitude_prune(m, 0.3, scope="global")}
    assert rows["features.0"] > 0.9 and rows["total"] == pytest.approx(0.3, abs=1e-3)


def test_csr_only_saves_past_the_break_even():
    w = torch.randn(64, 64)
    dense = w.numel() * 4
    assert prune.csr_breakeven_sparsity(4, 8) == pytest.approx(2 / 3)
    assert prune.csr_breakeven_sparsity(4, 4) == pytest.approx(0.5)
    half = w * prune.global_magnitude_masks([w], 0.5)[0]
    assert prune.csr_bytes(half) > dense  # 50% sparse costs MORE as CSR with int64 indices
    ninety = w * prune.global_magnitude_masks([w], 0.9)[0]
    assert prune.csr_bytes(ninety) < dense
    assert prune.csr_bytes(ninety) == 410 * 4 + 410 * 8 + 65 * 8


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "0.5", None, True])
def test_bad_sparsity_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=r"sparsity=.*\[0, 1\)"):
        prune.magnitude_prune(net(), bad)


def test_bad_scope_and_nothing_to_prune():
    with pytest.raises(LabkitError, match="scope='local'"):
        prune.magnitude_prune(net(), 0.5, scope="local")
    with pytest.raises(LabkitError, match="no Linear/Conv2d"):
        prune.magnitude_prune(net(), 0.5, skip=("features", "classifier"))
