"""The one skip rule quantization and pruning share."""

import pytest
import torch
from torch import nn

from labkit import prune
from labkit.quant import Int8Config, quantize_
from labkit.skip import DEFAULT_SKIP, is_skipped


@pytest.mark.parametrize("name,skip,expected", [
    ("lm_head", DEFAULT_SKIP, True),
    ("model.lm_head", DEFAULT_SKIP, True),
    ("model.layers.0.mlp.lm_head_adapter", DEFAULT_SKIP, False),  # whole components, not substrings
    ("features.0", ("features",), True),  # a parent's name skips its children
    ("model.layers.3.self_attn.q_proj", ("*_proj",), True),
    ("model.layers.3.self_attn.q_proj", ("model.layers.3",), True),
    ("model.layers.13.self_attn.q_proj", ("model.layers.3",), False),
    ("model.layers.3.mlp.up_proj", ("model.layers.*.self_attn",), False),
    ("classifier", ("head",), False),
])
def test_is_skipped(name, skip, expected):
    assert is_skipped(name, skip) is expected


def _net() -> nn.Module:
    return nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), nn.Linear(8, 4))


def test_quantize_and_prune_skip_the_same_layers():
    skip = ("0",)  # the whole first block
    q = _net()
    report = quantize_(q, Int8Config(), skip=skip)
    pruned = [n for n, _ in prune.prunable_layers(_net(), skip)]
    assert report.quantized == pruned == ["1"]
    assert set(report.skipped) == {"0.0", "0.2"}
    assert torch.isfinite(q(torch.randn(2, 8))).all()
