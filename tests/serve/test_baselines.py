"""How the HF baselines generate and time: EOS off (not forbidden), TTFT from the run's start."""

import torch

from labkit.serve import LLM, SamplingParams, baselines
from tests.conftest import tiny_llama

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
MAX_TOKENS = [6, 9, 4]


def engine_greedy(model):
    llm = LLM(model, None, max_model_len=64, block_size=4)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in MAX_TOKENS]
    return [o.token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def test_reference_keeps_a_greedy_eos_instead_of_forbidding_it():
    first = baselines.hf_sequential(tiny_llama(seed=1), PROMPTS[:1], [1]).token_ids[0][0]
    model = tiny_llama(seed=1, eos_token_id=first)  # the greedy first token *is* EOS now
    ref = baselines.hf_sequential(model, PROMPTS, MAX_TOKENS)
    assert ref.token_ids[0][0] == first  # min_new_tokens would have replaced it by the runner-up
    assert [len(t) for t in ref.token_ids] == MAX_TOKENS
    assert ref.token_ids == engine_greedy(model)  # like with like: the engine's ignore_eos


def test_every_baseline_matches_the_engine_token_for_token():
    model = tiny_llama(seed=3)
    want = engine_greedy(model)
    assert baselines.hf_static(model, PROMPTS, MAX_TOKENS, 2).token_ids == want
    with baselines.HFContinuous(model, page_size=4, num_blocks=64, max_batch_tokens=64, max_new_tokens=16) as cb:
        assert cb.run(PROMPTS, MAX_TOKENS).token_ids == want


def test_ttft_counts_from_the_start_of_the_run_for_every_variant():
    model = tiny_llama(seed=3)
    seq = baselines.hf_sequential(model, PROMPTS, MAX_TOKENS)
    # One at a time: request i waits for every request before it, so TTFTs grow with arrival order.
    assert seq.ttft_s == sorted(seq.ttft_s) and seq.ttft_s[-1] > seq.ttft_s[0]
    assert all(0 < t <= seq.wall_s for t in seq.ttft_s)
    static = baselines.hf_static(model, PROMPTS, MAX_TOKENS, 2)
    assert static.ttft_s[2] > static.ttft_s[0] == static.ttft_s[1]  # the second batch starts after the first
    assert len(seq.ttft_s) == len(static.ttft_s) == len(PROMPTS)


def test_tpot_is_the_mean_gap_after_the_first_token():
    run = baselines.hf_sequential(tiny_llama(seed=3), PROMPTS, MAX_TOKENS)
    assert len(run.tpot_s) == 3 and all(t > 0 for t in run.tpot_s)
    assert torch.tensor(run.tpot_s).max() < run.wall_s
