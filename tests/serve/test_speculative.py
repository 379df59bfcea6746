"""Speculative decoding: greedy gives exactly plain greedy's tokens, whatever the proposer; sampling keeps the
target's distribution; the counts add up; bad configs are named."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from labkit import LabkitError
from labkit.decode import StaticDecoder
from labkit.distill import layer_dropped_lm
from labkit.serve.speculative import SpeculativeConfig, accept, generate, ngram_propose
from tests.conftest import tiny_llama


def test_ngram_lookup_proposes_what_followed_the_latest_match():
    ctx = [1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3]
    assert ngram_propose(ctx, k=2, n_max=3) == [7, 8]  # the latest earlier "1 2 3" was followed by 7 8
    assert ngram_propose([5, 6, 7], k=3) == []  # nothing recurs
    assert ngram_propose([4, 4], k=3, n_max=2) == [4]  # a match near the end proposes what there is
    assert ngram_propose([1, 2, 5, 6, 2], k=2, n_max=2, n_min=2) == []  # only the 1-gram "2" recurs


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 20), k=st.integers(1, 6), method=st.sampled_from(["ngram", "draft_model"]))
def test_greedy_speculation_gives_plain_greedys_tokens(seed, k, method):
    model = tiny_llama(seed=2)
    prompt = torch.randint(3, 200, (12,), generator=torch.Generator().manual_seed(seed)).tolist()
    prompt = prompt + prompt[:6]  # a repeat, so n-gram lookup has something to propose
    target = StaticDecoder(model, max_len=96)
    plain = target.generate(torch.tensor([prompt]), 30)[0].tolist()
    cfg = {"method": method, "num_speculative_tokens": k}
    if method == "draft_model":
        cfg["model"] = layer_dropped_lm(model, keep_every=2)
    out = generate(target, prompt, 30, cfg)
    assert out.tokens == plain
    assert out.rounds == len(out.per_round) and out.accepted == sum(out.per_round) <= out.proposed
    assert 1 + out.rounds + out.accepted == 30  # the prefill gives one token; each round its accepted drafts + one


def test_a_perfect_draft_is_always_accepted():
    model = tiny_llama(seed=6)
    prompt = list(range(5, 17))
    out = generate(StaticDecoder(model, max_len=64), prompt, 25,
                   SpeculativeConfig(method="draft_model", model=model, num_speculative_tokens=4))
    assert out.acceptance_rate == 1.0 and out.per_round == [4, 4, 4, 4, 3]  # 1 + 4 x (4 + 1) + (3 + 1) = 25
    assert out.tokens_per_round == pytest.approx(25 / 5)


def test_rejection_sampling_keeps_the_targets_distribution():
    """The accept/replace rule alone, many times: the emitted first token follows p, whatever q proposed."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    q = torch.tensor([[0.1, 0.1, 0.8]])
    counts = torch.zeros(3)
    n = 20000
    for _ in range(n):
        d = int(torch.multinomial(q[0], 1, generator=g))
        kept, nxt = accept(p, [d], q, greedy=False, gen=g)
        counts[d if kept else nxt] += 1
    assert torch.allclose(counts / n, p[0], atol=0.015)
    counts.zero_()
    for _ in range(n):  # an n-gram draft is a point mass on token 2
        kept, nxt = accept(p, [2], None, greedy=False, gen=g)
        counts[2 if kept else nxt] += 1
    assert torch.allclose(counts / n, p[0], atol=0.015)


def test_sampling_is_reproducible_with_a_seed():
    model = tiny_llama(seed=2)
    target = StaticDecoder(model, max_len=64)
    cfg = {"method": "ngram", "num_speculative_tokens": 3}
    a = generate(target, [3, 4, 5, 3, 4], 20, cfg, temperature=0.8, seed=1).tokens
    assert a == generate(target, [3, 4, 5, 3, 4], 20, cfg, temperature=0.8, seed=1).tokens and len(a) == 20


def test_bad_configs_are_named():
    model = tiny_llama(seed=2)
    target = StaticDecoder(model, max_len=32)
    with pytest.raises(LabkitError, match="method='eagle'.*allowed: ngram, draft_model"):
        SpeculativeConfig(method="eagle")
    with pytest.raises(LabkitError, match="num_speculative_tokens=0"):
        SpeculativeConfig(num_speculative_tokens=0)
    with pytest.raises(LabkitError, match="prompt_lookup_min=3 is above prompt_lookup_max=2"):
        SpeculativeConfig(prompt_lookup_min=3, prompt_lookup_max=2)
    with pytest.raises(LabkitError, match="model= is the draft model"):
        SpeculativeConfig(method="draft_model")
    with pytest.raises(LabkitError, match="'speculative_model'.*known keys"):
        generate(target, [1, 2], 4, {"speculative_model": "x"})
    with pytest.raises(LabkitError, match="past the target's max_len=32"):
        generate(target, [1] * 20, 10, {"method": "ngram"})
    with pytest.raises(LabkitError, match="max_new_tokens=0"):
        generate(target, [1, 2], 0, {"method": "ngram"})
    with pytest.raises(LabkitError, match="prompt is empty"):
        generate(target, [], 3, {"method": "ngram"})
    with pytest.raises(LabkitError, match="pos=9 must lie in 0..0"):
        target.reset()
        target.rewind(9)
