"""The batched sampler: one transfer a step, the same tokens as sampling row by row."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from labkit.serve.sampling import SamplingParams, sample, sample_batch


@settings(max_examples=25, deadline=None)
@given(kinds=st.lists(st.sampled_from(["greedy", "temp", "topk", "topp"]), min_size=0, max_size=8),
       seed=st.integers(0, 1000))
def test_batch_equals_row_by_row(kinds, seed):
    torch.manual_seed(seed)
    logits = torch.randn(len(kinds), 300)
    make = {"greedy": dict(temperature=0.0), "temp": dict(temperature=0.7), "topk": dict(temperature=1.0, top_k=5),
            "topp": dict(temperature=1.0, top_p=0.5)}
    params = [SamplingParams(**make[k]) for k in kinds]
    gens = lambda: [None if p.greedy else torch.Generator().manual_seed(seed + i) for i, p in enumerate(params)]  # noqa: E731
    one_by_one = [sample(logits[i], p, g) for i, (p, g) in enumerate(zip(params, gens()))]
    assert sample_batch(logits, params, gens()) == one_by_one


def test_greedy_ids_survive_the_float_transfer_for_a_large_vocabulary():
    logits = torch.full((3, 49152), -1.0)
    for row, tok in enumerate((49151, 16777215 % 49152, 1)):
        logits[row, tok] = 5.0
    assert sample_batch(logits, [SamplingParams(temperature=0.0)] * 3, [None] * 3) == [49151, 16777215 % 49152, 1]


def test_one_device_to_host_transfer_per_step(monkeypatch):
    calls = []
    real = torch.Tensor.cpu

    def counting_cpu(self, *a, **k):
        calls.append(tuple(self.shape))
        return real(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.9), SamplingParams(temperature=0.0)]
    sample_batch(torch.randn(3, 50), params, [None, torch.Generator().manual_seed(0), None])
    assert len(calls) == 1  # greedy ids and the sampled row's logits travel together


def test_a_top_p_below_fp32s_smallest_number_keeps_the_top_token():
    from labkit.serve.sampling import SamplingParams, probabilities

    logits = torch.tensor([1.0, 3.0, 2.0])
    probs = probabilities(logits, SamplingParams(temperature=1.0, top_p=1e-300))
    assert probs.nonzero().flatten().tolist() == [1]  # only the top token, and it can be drawn
