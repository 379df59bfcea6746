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


def test_speculative_decoding_on_cuda():
    """Greedy speculation on CUDA gives plain greedy's tokens; sampling (drawn on the CPU) runs and is seeded."""
    from labkit.decode import StaticDecoder
    from labkit.serve.speculative import generate
    from tests.conftest import tiny_llama

    model = tiny_llama(seed=2).cuda()
    target = StaticDecoder(model, max_len=96)
    prompt = [5, 6, 7, 8, 9, 5, 6, 7]
    plain = target.generate(torch.tensor([prompt], device="cuda"), 24)[0].tolist()
    for cfg in ({"method": "ngram"}, {"method": "draft_model", "model": model}):
        assert generate(target, prompt, 24, cfg).tokens == plain
    a = generate(target, prompt, 16, {"method": "ngram"}, temperature=0.8, seed=3).tokens
    assert a == generate(target, prompt, 16, {"method": "ngram"}, temperature=0.8, seed=3).tokens
