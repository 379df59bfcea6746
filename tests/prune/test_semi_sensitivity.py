"""2:4 masks and the sensitivity scan."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from labkit import LabkitError, evaluate, prune
from labkit.data import digits_splits
from labkit.zoo import DigitsCNN, load_vision


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 16), groups=st.integers(1, 16), seed=st.integers(0, 999))
def test_two_four_keeps_the_two_largest_of_every_four(rows, groups, seed):
    w = torch.randn(rows, 4 * groups, generator=torch.Generator().manual_seed(seed))
    mask = prune.two_four_mask(w)
    assert (mask.view(-1, 4).sum(1) == 2).all()
    kept = (w.abs() * mask).view(-1, 4)
    dropped = (w.abs() * ~mask).view(-1, 4)
    assert (kept.max(1).values >= dropped.max(1).values).all()
    assert prune.is_2_4(w * mask) and (groups < 1 or not prune.is_2_4(w))


def test_apply_2_4_masks_every_linear_and_halves_nonzeros():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    masks = prune.apply_2_4(m)
    prune.make_permanent(m)
    assert set(masks) == {"0", "2"} and all(prune.is_2_4(m[i].weight) for i in (0, 2))


def test_two_four_needs_a_multiple_of_four():
    with pytest.raises(LabkitError, match="multiple of 4"):
        prune.two_four_mask(torch.randn(3, 6))


def test_no_gpu_says_what_2_4_needs():
    ok, why = prune.semi_structured_support()
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert not ok and ("sm_80" in why or "8.0" in why)
    with pytest.raises(LabkitError, match="not available here"):
        prune.to_semi_structured(torch.nn.Linear(8, 8))


def test_matmul_speedup_says_why_it_skips():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = prune.semi_structured.matmul_speedup()
    assert out["status"] == "skipped" and "CUDA" in out["reason"]


@pytest.mark.gpu
def test_semi_structured_matmul_speedup_record():
    out = prune.semi_structured.matmul_speedup(features=1024, tokens=512, repeats=3)
    if out["status"] == "skipped":
        pytest.skip(out["reason"])
    assert out["max_abs_diff"] < 0.5 and out["speedup"] > 0


@pytest.mark.gpu
def test_semi_structured_matmul_matches_the_masked_dense_one():
    ok, why = prune.semi_structured_support()
    if not ok:
        pytest.skip(why)
    torch.manual_seed(0)
    layer = torch.nn.Linear(128, 128, bias=False).half().cuda()
    prune.apply_2_4(layer, skip=())
    prune.make_permanent(layer)
    x = torch.randn(64, 128, device="cuda", dtype=torch.half)
    ref = layer(x)
    assert prune.to_semi_structured(layer, skip=()) == 1
    assert torch.allclose(layer(x), ref, atol=1e-2, rtol=1e-2)


def test_sensitivity_scan_restores_weights_and_proposes_ratios():
    m = load_vision("digits-cnn", progress=False)
    x, y = digits_splits()["test"]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    rows = prune.scan(
        m, lambda mm: evaluate.classifier_accuracy(mm, x, y), (0.5, 0.9), layers=["features.0", "classifier.1"]
    )
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert len(rows) == 1 + 2 * 2 and rows[0]["layer"] == "dense"
    ratios = prune.propose_ratios(rows, tolerance=0.02)
    assert set(ratios) == {"features.0", "classifier.1"}
    # the big classifier layer takes far more pruning than the 144-weight first conv
    assert ratios["classifier.1"] >= ratios["features.0"]
    with pytest.raises(LabkitError, match="not a prunable layer"):
        prune.scan(m, lambda mm: 0.0, layers=["nope"])
    with pytest.raises(LabkitError, match="dense"):
        prune.propose_ratios(rows[1:], 0.01)
    assert DigitsCNN  # the architecture the scan ran on


def test_channel_scan_removes_channels_on_a_copy_and_feeds_propose_ratios():
    m = load_vision("digits-cnn", progress=False)
    x, y = digits_splits()["test"]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    rows = prune.scan_channels(m, lambda mm: evaluate.classifier_accuracy(mm, x, y), (0.25, 0.5),
                               example_inputs=torch.zeros(1, 1, 8, 8), ignored_layers=[m.classifier[-1]])
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # the model itself is untouched
    assert [r["layer"] for r in rows] == ["dense"] + [n for n in ("features.0", "features.2", "classifier.1")
                                                      for _ in range(2)]
    dense = rows[0]["params"]
    for layer in ("features.0", "features.2", "classifier.1"):
        a, b = (r for r in rows if r["layer"] == layer)
        assert dense > a["params"] > b["params"]  # channels really went, more at the higher ratio
    assert set(prune.propose_ratios(rows, tolerance=0.02)) == {"features.0", "features.2", "classifier.1"}
    with pytest.raises(LabkitError, match="not part of this model"):
        prune.scan_channels(m, lambda mm: 0.0, example_inputs=torch.zeros(1, 1, 8, 8),
                            ignored_layers=[load_vision("digits-cnn", progress=False).classifier[-1]])
    with pytest.raises(LabkitError, match="no Conv2d or Linear"):
        prune.scan_channels(m, lambda mm: 0.0, example_inputs=torch.zeros(1, 1, 8, 8),
                            ignored_layers=[mod for mod in m.modules() if isinstance(mod, (torch.nn.Conv2d,
                                                                                          torch.nn.Linear))])
