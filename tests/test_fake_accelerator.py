"""The stand-in accelerator that nbmake's notebook run uses (tests/conftest.py): it must catch what a GPU would
refuse, and let device-correct code through."""

import copy

import pytest
import torch
from torch import nn

from labkit import data, env, evaluate, zoo

from .fake_accelerator import STANDIN, AcceleratorMode, DeviceMixError, on_accelerator


@pytest.fixture
def accelerator(monkeypatch):
    monkeypatch.setenv("LABKIT_DEVICE", str(STANDIN))
    with AcceleratorMode():
        yield env.default_device()


def test_notebook_02s_old_cell_11_is_caught(accelerator):
    """As notebook 02 was: the CNN on DEVICE, the test batch from digits_splits() on the CPU."""
    cnn = zoo.DigitsCNN().to(accelerator)
    xte = data.digits_splits()["test"][0]
    with pytest.raises(DeviceMixError, match="mixes devices"):
        cnn(xte[:256])
    xte = data.digits_splits(device=accelerator)["test"][0]  # the fix
    assert on_accelerator(cnn(xte[:256]))


def test_device_correct_code_passes_and_keeps_its_tags(accelerator):
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)).to(accelerator)
    x = torch.randn(5, 8)
    x_dev = x.to(accelerator)
    assert on_accelerator(x_dev) and not on_accelerator(x)  # the CPU original stays on the CPU
    out = model(x_dev)
    assert on_accelerator(out) and out.device == accelerator
    twin = copy.deepcopy(model)  # a copy lives where the original does
    assert on_accelerator(twin(x_dev))
    mask = torch.ones(5, 2, device=out.device)  # the canonical device-following idiom
    assert on_accelerator(out * mask)
    assert not on_accelerator(out.cpu()) and out.detach().cpu().numpy().shape == (5, 2)
    assert out.sum().item() == pytest.approx(float(out.detach().cpu().sum()))
    scalar = torch.tensor(2.0)  # 0-dim CPU tensors mix freely, as on CUDA
    assert on_accelerator(out * scalar)


def test_what_a_gpu_refuses_is_refused(accelerator):
    model = nn.Linear(8, 2).to(accelerator)
    out = model(torch.randn(3, 8, device=accelerator))
    with pytest.raises(DeviceMixError, match="numpy"):
        out.detach().numpy()
    with pytest.raises(DeviceMixError, match="mixes devices"):
        torch.cat([out, torch.zeros(3, 2)])
    with pytest.raises(DeviceMixError, match="mixes devices"):
        out[torch.zeros(3, dtype=torch.bool)] += torch.ones(3, 2)[:0]  # an in-place op with a CPU operand
    assert evaluate.classifier_accuracy(model, torch.randn(4, 8), torch.zeros(4, dtype=torch.long)) >= 0  # it moves


def test_without_the_mode_nothing_is_tagged():
    assert not on_accelerator(torch.zeros(3).to(STANDIN))
