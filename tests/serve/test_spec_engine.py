"""Speculative decoding inside the paged engine: guessed tokens are verified in the step, greedy output stays
token-identical to plain greedy (and to Hugging Face), rejected guesses give their KV blocks back."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from labkit import LabkitError
from labkit.serve import LLM, SamplingParams
from labkit.serve.block_manager import BlockManager
from labkit.serve.sampling import verify_batch
from labkit.serve.sequence import Sequence
from tests.conftest import tiny_llama
from tests.serve.test_engine import MODEL, hf_greedy
from tests.serve.test_engine import run as serve

NGRAM = {"method": "ngram", "num_speculative_tokens": 4}
N_NEW = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=N_NEW, ignore_eos=True)


def copy_prompts(seed=0, count=4, period=6, repeats=4):
    """Prompts that repeat a random stretch (prompt lookup pays on them), and one that does not repeat."""
    g = torch.Generator().manual_seed(seed)
    out = [torch.randint(3, 49152, (period,), generator=g).tolist() * repeats for _ in range(count)]
    return out + [torch.randint(3, 49152, (period * repeats,), generator=g).tolist()]


def run(ps, params=GREEDY, **kw):
    return serve(ps, params, **kw)


@pytest.mark.parametrize("block_size", [1, 3, 4, 16])
@pytest.mark.parametrize("caching", [False, True])
def test_ngram_speculation_is_token_identical_and_takes_fewer_steps(block_size, caching):
    ps = copy_prompts()
    plain, lp = run(ps, block_size=block_size, enable_prefix_caching=caching)
    spec, ls = run(ps, block_size=block_size, enable_prefix_caching=caching, speculative_config=NGRAM)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain] == [hf_greedy(p, N_NEW) for p in ps]
    assert ls.stats.spec_proposed > 0 and ls.stats.spec_accepted > 0
    assert ls.stats.steps < lp.stats.steps
    assert all(o.finish_reason == "length" for o in spec)


def oracle(llm, refs, rng, k):
    """A proposer that knows the right continuation and spoils it at a random place: partial acceptance, every
    rollback length, guesses crossing block boundaries."""
    eng = llm.engine

    def propose():
        drafts = {}
        for seq in eng.scheduler.running:
            if len(seq) - seq.num_computed_tokens != 1 or seq.seq_id in eng.pending_forks:
                continue
            _, p, out = eng.requests[seq.seq_id]
            n = min(k, p.max_tokens - len(out.token_ids) - 1, eng.config.max_model_len - len(seq) - 1)
            if n <= 0:
                continue
            right = refs[tuple(out.prompt_token_ids)][len(out.token_ids):][:n]
            bad = rng.randint(0, n)  # guesses from here on are wrong
            drafts[seq.seq_id] = right[:bad] + [(t + 1) % 49152 for t in right[bad:]]
        return drafts

    eng._propose = propose


@settings(max_examples=12, deadline=None)
@given(block_size=st.sampled_from([1, 2, 4, 5, 16]), k=st.integers(1, 7), seed=st.integers(0, 10**6),
       caching=st.booleans())
def test_partly_wrong_guesses_roll_back_and_keep_greedys_tokens(block_size, k, seed, caching):
    ps = copy_prompts(seed=seed % 7, count=2) + [[5, 6, 7]]
    refs = {tuple(p): hf_greedy(p, N_NEW) for p in ps}
    llm = LLM(MODEL, None, max_model_len=128, block_size=block_size, enable_prefix_caching=caching,
              speculative_config={"method": "ngram", "num_speculative_tokens": k})
    oracle(llm, refs, random.Random(seed), k)
    eng, outs = llm.engine, {}
    ids = [eng.add_request(p, GREEDY) for p in ps]
    while eng.has_unfinished():
        for o, _ in eng.step():
            outs[o.request_id] = o
        live = list(eng.scheduler.running)
        eng.bm.check_invariants(live)
        for s in live:  # after rollback a sequence holds no block beyond its tokens
            assert len(s.block_table) <= -(-len(s) // block_size)
    assert [outs[i].token_ids for i in ids] == [refs[tuple(p)] for p in ps]
    assert eng.stats.spec_accepted < eng.stats.spec_proposed
    assert eng.bm.num_free == len(eng.bm.blocks)


def test_speculation_survives_preemption_and_contiguous_exact_reservation():
    ps = copy_prompts(count=6)
    ref = [hf_greedy(p, N_NEW) for p in ps]
    small, ls = run(ps, block_size=4, num_blocks=24, max_num_seqs=8, max_model_len=64, speculative_config=NGRAM)
    assert ls.stats.preemptions > 0 and ls.stats.spec_accepted > 0
    exact, _ = run(ps, block_size=4, paged=False, kv_reservation="exact", speculative_config=NGRAM)
    assert [o.token_ids for o in small] == [o.token_ids for o in exact] == ref


def test_guesses_never_exceed_the_token_budget():
    ps = copy_prompts()
    llm = LLM(MODEL, None, block_size=4, max_model_len=128, max_num_batched_tokens=6, record_history=True,
              speculative_config={"method": "ngram", "num_speculative_tokens": 8})
    outs = llm.generate(ps, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == [hf_greedy(p, N_NEW) for p in ps]
    assert max(sum(n for _, n in s["scheduled"]) for s in llm.stats.history) <= 6


def test_int8_kv_cache_speculates_too():
    ps = copy_prompts()
    plain, _ = run(ps, block_size=4, kv_cache_dtype="int8")
    spec, ls = run(ps, block_size=4, kv_cache_dtype="int8", speculative_config=NGRAM)
    assert ls.stats.spec_accepted > 0
    agree = sum(a.token_ids == b.token_ids for a, b in zip(plain, spec))
    assert agree >= len(ps) - 1  # int8 K/V rounding may flip a near tie; the verification itself is exact


def test_max_tokens_and_eos_cut_the_kept_guesses():
    ps = copy_prompts(count=2)
    for n in (1, 2, 5):
        outs, _ = run(ps, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True), speculative_config=NGRAM)
        assert [o.token_ids for o in outs] == [hf_greedy(p, N_NEW)[:n] for p in ps]
    eos = hf_greedy(ps[0], N_NEW)[3]  # a token greedy makes: it ends the request there, even among kept guesses
    llm = LLM(MODEL, None, block_size=4, max_model_len=128, speculative_config=NGRAM)
    llm.engine.eos_token_id = eos
    out = llm.generate([ps[0]], SamplingParams(temperature=0.0, max_tokens=N_NEW), use_tqdm=False)[0]
    ref = hf_greedy(ps[0], N_NEW)
    assert out.finish_reason == "stop" and out.token_ids == ref[:ref.index(eos) + 1]
    assert llm.engine.bm.num_free == len(llm.engine.bm.blocks)


def test_parallel_and_seeded_sampling_with_speculation():
    p = copy_prompts(count=1)[0]
    greedy, _ = run([p], SamplingParams(temperature=0.0, max_tokens=N_NEW, ignore_eos=True, n=3), block_size=4,
                    speculative_config=NGRAM)
    assert all(s.token_ids == hf_greedy(p, N_NEW) for s in greedy[0].samples)
    sp = SamplingParams(temperature=0.8, max_tokens=N_NEW, ignore_eos=True, n=3, seed=5)
    a, la = run([p], sp, block_size=4, speculative_config=NGRAM)
    b, _ = run([p], sp, block_size=4, speculative_config=NGRAM)
    assert [s.token_ids for s in a[0].samples] == [s.token_ids for s in b[0].samples]
    assert la.stats.spec_proposed > 0


def test_verify_batch_greedy_keeps_the_matching_prefix():
    vocab = 10
    logits = torch.full((6, vocab), -1.0)
    for row, best in enumerate([3, 4, 9, 1, 2, 7]):
        logits[row, best] = 1.0
    greedy = SamplingParams(temperature=0.0)
    # sequence 0: guesses 3, 4, 5 (rows 0-3; the target says 3, 4, 9, 1) -> keeps 3, 4 then the target's 9
    # sequence 1: no guesses (row 4) -> the target's 2;  sequence 2: guess 8 (rows 5 and beyond) is wrong -> 7
    got = verify_batch(torch.cat([logits, torch.zeros(1, vocab)]), [[3, 4, 5], [], [8]], [greedy] * 3, [None] * 3)
    assert got == [[3, 4, 9], [2], [7]]


def test_verify_batch_sampling_keeps_the_targets_distribution():
    torch.manual_seed(0)
    logits = torch.randn(2, 6) * 1.5
    p = torch.softmax(logits[0], 0)
    sp = SamplingParams(temperature=1.0)
    g = torch.Generator().manual_seed(1)
    first = torch.tensor([verify_batch(logits, [[2]], [sp], [g])[0][0] for _ in range(4000)])
    freq = torch.bincount(first, minlength=6).float() / len(first)
    assert (freq - p).abs().max() < 0.03  # the guess changes the cost, never the distribution


def test_block_manager_lookahead_copy_on_write_and_trim():
    bm = BlockManager(16, 4)
    s = Sequence(list(range(5)), block_size=4)
    bm.allocate(s)
    assert len(s.block_table) == 2
    assert bm.append_cost(s, 6) == 1 and bm.can_append(s, 6)  # 5 + 6 = 11 tokens: 3 blocks
    assert bm.append_slot(s, 6) is None and len(s.block_table) == 3
    bm.trim(s, 5)
    assert len(s.block_table) == 2 and bm.num_free == 14
    child = Sequence(list(range(5)), block_size=4)
    bm.fork(s, child)  # both share blocks 0 and 1; the first write (token 4, block 1) must copy
    assert bm.append_cost(child, 4) == 2  # a private copy of block 1 plus one new block
    src, dst = bm.append_slot(child, 4)
    assert src == s.block_table[1] and child.block_table[1] == dst and child.block_table[0] == s.block_table[0]
    bm.check_invariants([s, child])
    bm.trim(child, 5)
    bm.free(child)
    bm.free(s)
    assert bm.num_free == 16
    bm.check_invariants([])


@pytest.mark.parametrize("spec,match", [
    ("ngram", "must be a dict"),
    ({"method": "draft_model"}, "model= is the draft model"),
    ({"method": "ngram", "lookahead": 3}, "'lookahead'.*known keys"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens=0"),
    ({"method": "medusa"}, "method='medusa'"),
])
def test_bad_speculative_configs_are_named(spec, match):
    with pytest.raises(LabkitError, match=match):
        LLM(MODEL, None, max_model_len=64, speculative_config=spec)
    assert issubclass(LabkitError, ValueError)


def draft_spec(model, k=4):
    return {"method": "draft_model", "model": model, "num_speculative_tokens": k}


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("caching", [False, True])
def test_a_draft_that_is_the_target_is_always_right(block_size, caching):
    """The target as its own draft: every guess is the target's greedy token, so all are kept."""
    ps = copy_prompts(count=3) + [[5, 6, 7]]
    plain, lp = run(ps, block_size=block_size, enable_prefix_caching=caching)
    spec, ls = run(ps, block_size=block_size, enable_prefix_caching=caching, speculative_config=draft_spec(MODEL))
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain] == [hf_greedy(p, N_NEW) for p in ps]
    assert ls.stats.spec_accepted == ls.stats.spec_proposed > 0
    assert ls.stats.steps < lp.stats.steps


@pytest.mark.parametrize("block_size,k,seed", [(1, 1, 2), (3, 6, 3), (4, 3, 5), (16, 4, 9)])
def test_a_wrong_draft_changes_no_greedy_token(block_size, k, seed):
    """Another random model proposes: most guesses are rejected, the tokens stay the target's."""
    ps = copy_prompts(count=2) + [[5, 6, 7]]
    spec, ls = run(ps, block_size=block_size, speculative_config=draft_spec(tiny_llama(seed=seed), k))
    assert [o.token_ids for o in spec] == [hf_greedy(p, N_NEW) for p in ps]
    assert ls.stats.spec_proposed > ls.stats.spec_accepted
    assert not ls.engine.drafter.seen  # every request forgotten once it ended


def test_a_layer_dropped_draft_survives_preemption_forks_and_exact_reservation():
    from labkit.distill import layer_dropped_lm

    draft = layer_dropped_lm(MODEL, keep=[0])
    ps = copy_prompts(count=6)
    ref = [hf_greedy(p, N_NEW) for p in ps]
    small, ls = run(ps, block_size=4, num_blocks=24, max_num_seqs=8, max_model_len=64,
                    speculative_config=draft_spec(draft))
    assert ls.stats.preemptions > 0 and ls.stats.spec_proposed > 0
    exact, _ = run(ps, block_size=4, paged=False, kv_reservation="exact", speculative_config=draft_spec(draft))
    assert [o.token_ids for o in small] == [o.token_ids for o in exact] == ref
    sp = SamplingParams(temperature=0.8, max_tokens=N_NEW, ignore_eos=True, n=3, seed=5)
    a, _ = run(ps[:1], sp, block_size=4, speculative_config=draft_spec(draft))
    b, _ = run(ps[:1], sp, block_size=4, speculative_config=draft_spec(draft))
    assert [x.token_ids for x in a[0].samples] == [x.token_ids for x in b[0].samples]
    greedy_n, _ = run(ps[:1], SamplingParams(temperature=0.0, max_tokens=N_NEW, ignore_eos=True, n=2), block_size=4,
                      speculative_config=draft_spec(MODEL))
    assert all(x.token_ids == ref[0] for x in greedy_n[0].samples)


def test_a_draft_with_another_vocabulary_is_refused():
    with pytest.raises(LabkitError, match="vocab_size=1000 differs"):
        LLM(MODEL, None, max_model_len=64, speculative_config=draft_spec(tiny_llama(vocab_size=1000)))
