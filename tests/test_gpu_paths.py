"""CUDA paths that the CPU tests cannot reach; ``gpu``-marked, run by the GPU check's first part."""

from __future__ import annotations

import pytest
import torch

from labkit import env
from labkit.quant import primitives
from labkit.serve.sampling import SamplingParams, sample_batch

pytestmark = pytest.mark.gpu


def test_batched_sampling_on_cuda_equals_the_cpu_result():
    torch.manual_seed(0)
    logits = torch.randn(6, 49152)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, seed=1, top_k=50)] * 3
    cpu = sample_batch(logits, params, [None if p.greedy else torch.Generator().manual_seed(1) for p in params])
    gpu = sample_batch(logits.cuda(), params, [None if p.greedy else torch.Generator().manual_seed(1) for p in params])
    assert cpu == gpu


def test_nf4_table_is_copied_to_the_gpu_once():
    dev = torch.device("cuda", torch.cuda.current_device())
    assert primitives.nf4_code_on(dev) is primitives.nf4_code_on(dev)
    codes, absmax = primitives.quantize_nf4(torch.randn(4096, device=dev))
    assert codes.device.type == "cuda" and primitives.dequantize_nf4(codes, absmax).device.type == "cuda"


def test_bf16_report_matches_the_compute_capability():
    major, _ = torch.cuda.get_device_capability()
    assert env.bf16_supported("cuda") == (major >= 8)
    assert env.resolve_device("cuda").type == "cuda"
