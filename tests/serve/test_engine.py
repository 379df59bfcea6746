"""Greedy output of the paged engine must equal Hugging Face's, token for token, in every configuration."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from labkit import LabkitError
from labkit.serve import LLM, SamplingParams
from labkit.serve.config import EngineConfig
from tests.conftest import tiny_llama

MODEL = tiny_llama(seed=1)
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def prompts(lengths, seed=0, shared_prefix=0):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, 49152, (shared_prefix,), generator=g).tolist()
    return [prefix + torch.randint(3, 49152, (n,), generator=g).tolist() for n in lengths]


_REF: dict = {}


def hf_greedy(p, n=10):
    key = (tuple(p), n)
    if key not in _REF:
        out = MODEL.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        _REF[key] = out[0, len(p):].tolist()
    return _REF[key]


def run(ps, params=GREEDY, **kw):
    """Serve ``ps``; every KV block must be back on the free list afterwards."""
    kw.setdefault("max_model_len", 128)
    kw.setdefault("record_history", True)
    llm = LLM(MODEL, None, **kw)
    outs = llm.generate(ps, params, use_tqdm=False)
    bm = llm.engine.bm
    assert bm.num_free == len(bm.blocks), "KV blocks leaked"
    bm.check_invariants([])
    return outs, llm


LENGTHS = [5, 17, 9, 33, 1, 16, 40]


@pytest.mark.parametrize("block_size", [1, 3, 4, 7, 16])
def test_token_identical_across_block_sizes(block_size):
    ps = prompts(LENGTHS)
    outs, _ = run(ps, block_size=block_size)
    for p, o in zip(ps, outs):
        assert o.token_ids == hf_greedy(p) and o.finish_reason == "length"


def test_forced_preemption_still_identical():
    ps = prompts(LENGTHS)
    outs, llm = run(ps, block_size=4, num_blocks=20, max_num_seqs=8, max_model_len=64)
    assert llm.stats.preemptions > 0
    assert [o.token_ids for o in outs] == [hf_greedy(p) for p in ps]


def test_chunked_prefill_identical_and_budget_respected():
    ps = prompts([60, 45, 3, 70])
    llm = LLM(MODEL, None, block_size=4, max_model_len=128, max_num_batched_tokens=16, record_history=True)
    ids = [llm.engine.add_request(p, GREEDY) for p in ps]
    outs = {}
    while llm.engine.has_unfinished():
        sched_before = llm.engine.stats.steps
        for o, _ in llm.engine.step():
            outs[o.request_id] = o
        assert llm.engine.stats.steps == sched_before + 1
    got = [outs[i].token_ids for i in sorted(outs)]
    assert got == [hf_greedy(p) for p in ps]
    per_step = [sum(n for _, n in s["scheduled"]) for s in llm.stats.history]
    assert max(per_step) <= 16 and max(per_step) == 16  # the budget binds, and is never exceeded
    chunks = [n for s in llm.stats.history for rid, n in s["scheduled"] if rid == ids[3]]
    assert len([n for n in chunks if n > 1]) >= 5 and sum(chunks) >= 70  # the 70-token prompt came in chunks


@pytest.mark.parametrize("caching", [False, True])
def test_prefix_caching_on_off_identical(caching):
    ps = prompts([3, 9, 14, 1], shared_prefix=21)
    first, llm = run(ps[:1], block_size=4, enable_prefix_caching=caching)
    outs = llm.generate(ps, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == [hf_greedy(p) for p in ps]
    assert (llm.stats.prefix_hit_blocks > 0) == caching
    assert llm.engine.bm.num_free == len(llm.engine.bm.blocks)
    state = llm.engine.state()  # vLLM's counters, in tokens: every prompt token asked, the full cached blocks found
    if caching:
        assert state["prefix_cache_queries_total"] == sum(len(p) for p in ps[:1] + ps)
        assert state["prefix_cache_hits_total"] == 4 * llm.engine.bm.prefix_hits
        assert 0 < state["prefix_cache_hits_total"] <= 5 * 20  # at most the 21-token shared prefix's 5 full blocks
    else:
        assert state["prefix_cache_queries_total"] == state["prefix_cache_hits_total"] == 0


def test_contiguous_mode_identical_and_wastes_more():
    ps = prompts(LENGTHS)
    paged, lp = run(ps, block_size=4)
    contiguous, lc = run(ps, block_size=4, paged=False)
    exact, le = run(ps, block_size=4, paged=False, kv_reservation="exact")
    assert [o.token_ids for o in contiguous] == [o.token_ids for o in paged] == [o.token_ids for o in exact]
    assert lc.stats.kv_waste_pct > 3 * lp.stats.kv_waste_pct
    assert lp.stats.kv_waste_pct < le.stats.kv_waste_pct < lc.stats.kv_waste_pct


def test_exact_reservation_admits_more_than_max_length_reservation():
    ps = prompts([6] * 8)  # 6 + 10 tokens = 4 blocks each exactly; max_model_len 128 = 32 blocks
    _, lc = run(ps, block_size=4, num_blocks=64, paged=False, max_num_seqs=8)
    _, le = run(ps, block_size=4, num_blocks=64, paged=False, kv_reservation="exact", max_num_seqs=8)
    first = lambda llm: llm.stats.steps  # noqa: E731 - fewer steps = more requests in flight together
    assert first(le) < first(lc)
    assert le.stats.peak_blocks == 8 * 4 and lc.stats.peak_blocks == 2 * 32


def test_abort_forgets_the_request_everywhere():
    llm = LLM(MODEL, None, max_model_len=128, block_size=4)
    rid = llm.engine.add_request([5, 6, 7], SamplingParams(temperature=0.7, seed=3, max_tokens=20))
    llm.engine.step()
    llm.engine.abort(rid)
    assert not llm.engine.requests and not llm.engine.generators and not llm.engine.has_unfinished()
    assert llm.engine.bm.num_free == len(llm.engine.bm.blocks)


@settings(max_examples=15, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=6), block_size=st.sampled_from([1, 2, 5, 8]),
       num_blocks=st.integers(13, 60), budget=st.integers(8, 64), max_seqs=st.integers(1, 4))
def test_random_workloads_respect_budgets_and_conserve_blocks(lengths, block_size, num_blocks, budget, max_seqs):
    cfg_len = 64
    if num_blocks * block_size < cfg_len:
        num_blocks = -(-cfg_len // block_size)
    llm = LLM(MODEL, None, block_size=block_size, num_blocks=num_blocks, max_num_seqs=max_seqs,
              max_num_batched_tokens=budget, max_model_len=cfg_len)
    eng = llm.engine
    ids = [eng.add_request(p, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
           for p in prompts(lengths, seed=len(lengths))]
    finished = []
    orig_schedule = eng.scheduler.schedule

    def checked(*args):
        out = orig_schedule(*args)
        assert out.num_tokens <= budget and len(eng.scheduler.running) <= max_seqs
        live = eng.scheduler.running
        eng.bm.check_invariants(live)
        return out

    eng.scheduler.schedule = checked
    for _ in range(1000):
        if not eng.has_unfinished():
            break
        finished += [o.request_id for o, _ in eng.step() if o.finished]
    assert sorted(finished) == sorted(ids)  # every request finished exactly once
    assert eng.bm.num_free == num_blocks


def test_sampling_is_seeded_across_block_sizes():
    ps = prompts([6, 8])
    sp = SamplingParams(temperature=1.0, top_k=5, top_p=0.9, max_tokens=8, seed=7, ignore_eos=True)
    b = LLM(MODEL, None, block_size=4, max_model_len=128).generate(ps, [sp, sp], use_tqdm=False)
    c = LLM(MODEL, None, block_size=16, max_model_len=128).generate(ps, [sp, sp], use_tqdm=False)
    assert [o.token_ids for o in b] == [o.token_ids for o in c]
    assert all(len(o.token_ids) == 8 for o in b)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), top_k=st.integers(1, 6), top_p=st.floats(0.05, 1.0))
def test_sampler_only_draws_from_the_top_k_and_the_top_p_nucleus(seed, top_k, top_p):
    from labkit.serve.sampling import sample

    logits = torch.randn(50, generator=torch.Generator().manual_seed(seed)) * 3
    order = torch.argsort(logits, descending=True)
    probs = torch.softmax(logits[order[:top_k]], -1)  # top-k first, renormalised, then the nucleus
    nucleus = int((torch.cumsum(probs, 0) - probs < top_p).sum())  # the smallest prefix reaching top_p
    allowed = set(order[:nucleus].tolist())
    g = torch.Generator().manual_seed(seed)
    drawn = {sample(logits, SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p), g) for _ in range(40)}
    assert drawn <= allowed
    if top_k == 1:
        assert drawn == {int(order[0])}


def test_eos_stops_unless_ignored():
    p = prompts([5])[0]
    ref = hf_greedy(p)
    eos = ref[3]
    llm = LLM(MODEL, None, block_size=4, max_model_len=128)
    llm.engine.eos_token_id = eos
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0]
    assert out.token_ids == ref[:ref.index(eos) + 1] and out.finish_reason == "stop"


def test_bad_inputs_are_clear():
    with pytest.raises(LabkitError, match="temperature=-1"):
        SamplingParams(temperature=-1)
    with pytest.raises(LabkitError, match="top_p=0"):
        SamplingParams(top_p=0)
    with pytest.raises(LabkitError, match="block_size=0"):
        EngineConfig(block_size=0)
    llm = LLM(MODEL, None, block_size=4, max_model_len=32)
    with pytest.raises(LabkitError, match="max_model_len is 32"):
        llm.generate([list(range(3, 40))], GREEDY, use_tqdm=False)
    with pytest.raises(LabkitError, match="empty"):
        llm.generate([[]], GREEDY, use_tqdm=False)


@pytest.mark.slow
def test_real_smollm2_matches_hf(smollm2):
    model, tok = smollm2
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    llm = LLM(model, tok, block_size=16, max_model_len=256)
    outs = llm.generate(texts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    for t, o in zip(texts, outs):
        ids = tok(t, return_tensors="pt", add_special_tokens=False)["input_ids"]
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                             do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        assert o.token_ids == ref
    assert "Paris" in outs[0].text


@pytest.mark.gpu
def test_cuda_runner_matches_hf():
    model = tiny_llama(seed=1).cuda()
    ps = prompts([5, 30, 12])
    llm = LLM(model, None, block_size=16, max_model_len=128)
    outs = llm.generate(ps, GREEDY, use_tqdm=False)
    for p, o in zip(ps, outs):
        out = model.generate(torch.tensor([p], device="cuda"), max_new_tokens=10, min_new_tokens=10,
                             do_sample=False, pad_token_id=0)
        assert o.token_ids == out[0, len(p):].tolist()


@pytest.mark.parametrize("block_size,prompt_len", [(4, 8), (4, 10), (16, 5), (1, 3)])
def test_parallel_sampling_shares_the_prompt_and_copies_on_write(block_size, prompt_len):
    p = prompts([prompt_len])[0]
    llm = LLM(MODEL, None, block_size=block_size, max_model_len=128)
    greedy = llm.generate([p], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, n=3), use_tqdm=False)[0]
    assert len(greedy.samples) == 3 and greedy.samples[0] is greedy
    assert all(s.token_ids == hf_greedy(p) for s in greedy.samples)  # a wrong CoW copy would change the tokens
    bm = llm.engine.bm
    assert bm.num_free == len(bm.blocks) and not llm.engine.requests and not llm.engine.pending_forks
    sp = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True, n=3, seed=11)
    sampled = llm.generate([p], sp, use_tqdm=False)[0]
    assert len({tuple(s.token_ids) for s in sampled.samples}) > 1
    again = llm.generate([p], sp, use_tqdm=False)[0]
    assert [s.token_ids for s in again.samples] == [s.token_ids for s in sampled.samples]  # seeded
    assert bm.num_free == len(bm.blocks)


def test_parallel_samples_use_fewer_blocks_than_separate_requests():
    p = prompts([40])[0]
    shared = LLM(MODEL, None, block_size=4, max_model_len=128)
    shared.generate([p], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, n=4), use_tqdm=False)
    separate = LLM(MODEL, None, block_size=4, max_model_len=128)
    separate.generate([p] * 4, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert shared.stats.peak_blocks < separate.stats.peak_blocks


def _held_slot_steps(llm) -> int:
    return sum(len(bt) * s["block_size"] for s in llm.stats.history for bt in s["block_tables"].values())


@pytest.mark.parametrize("paged,reservation", [(True, "max_model_len"), (False, "max_model_len"), (False, "exact")])
def test_waste_breakdown_splits_every_held_slot_by_the_papers_three_kinds(paged, reservation):
    """Used + reserved (future tokens) + internal fragmentation = every held slot; each kind where it belongs."""
    ps = prompts([3, 17, 9, 30, 5, 12], seed=4)
    llm = LLM(MODEL, None, max_model_len=64, block_size=4, num_blocks=40, paged=paged, kv_reservation=reservation,
              record_history=True)
    llm.generate(ps, GREEDY, use_tqdm=False)
    st_ = llm.stats
    assert not st_.open_traces
    assert st_.used_slot_steps + st_.reserved_slot_steps + st_.internal_slot_steps == _held_slot_steps(llm)
    assert st_.pool_slot_steps == 40 * 4 * st_.steps
    pct = st_.waste_breakdown_pct()
    if paged:  # a paged request never holds more than its last, partly filled block beyond its tokens
        assert st_.external_slot_steps == 0 and pct["internal_fragmentation"] < pct["reserved"] < pct["used"]
    elif reservation == "exact":  # prompt + max_tokens is reserved and (ignore_eos) all of it is produced
        assert pct["reserved"] > pct["internal_fragmentation"]
    else:  # max_model_len reserved for requests that stop at 10 new tokens
        assert pct["internal_fragmentation"] > pct["used"]


def test_external_fragmentation_counts_free_blocks_stranded_in_holes():
    """Contiguous first fit: short requests finish first and leave 2-block holes; with 10 blocks free in all,
    the next 10-block request still waits."""
    short, long_ = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), GREEDY
    ps = prompts([6, 30, 6, 30, 6, 30, 30], seed=5)  # short: 8 tokens = 2 blocks; long: 40 tokens = 10 blocks
    params = [short, long_, short, long_, short, long_, long_]
    kw = dict(max_model_len=64, block_size=4, num_blocks=40, max_num_seqs=8)
    llm = LLM(MODEL, None, paged=False, kv_reservation="exact", record_history=True, **kw)
    llm.generate(ps, params, use_tqdm=False)
    assert llm.stats.external_slot_steps >= 10 * 4  # at least one step with all 10 free blocks stranded
    paged = LLM(MODEL, None, record_history=True, **kw)
    paged.generate(ps, params, use_tqdm=False)
    assert paged.stats.external_slot_steps == 0


def test_llm_takes_engine_settings_from_the_config_fields(tokenizer):
    """LLM's engine keywords are EngineConfig's fields, nothing re-listed: a typo names the allowed ones."""
    from dataclasses import fields

    llm = LLM(tiny_llama(seed=0), tokenizer, block_size=4, max_model_len=64, max_num_seqs=2, decode_group=2)
    assert (llm.engine.config.block_size, llm.engine.config.decode_group) == (4, 2)
    with pytest.raises(ValueError, match="max_seqs: not engine settings; allowed: block_size, num_blocks"):
        LLM(tiny_llama(seed=0), tokenizer, max_seqs=2)
    allowed = ", ".join(f.name for f in fields(EngineConfig))
    with pytest.raises(ValueError, match=allowed):
        EngineConfig.from_kwargs(bogus=1)


def test_reset_stats_counts_afresh_without_touching_the_scheduler(tiny_lm):
    from labkit.serve import LLM, SamplingParams

    llm = LLM(tiny_lm, None, block_size=4, num_blocks=12, max_model_len=48, max_num_seqs=4)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    llm.generate([[5] * 12, [6] * 12, [7] * 12], params, use_tqdm=False)  # a small pool: preemptions happen
    first = llm.stats.preemptions
    assert first > 0 and llm.stats.preemptions == llm.engine.scheduler.num_preemptions
    before = llm.engine.scheduler.num_preemptions
    llm.reset_stats()
    assert llm.stats.steps == 0 and llm.stats.preemptions == 0
    assert llm.engine.scheduler.num_preemptions == before  # the scheduler's own count is not rewritten
    llm.generate([[5] * 12, [6] * 12, [7] * 12], params, use_tqdm=False)
    assert llm.stats.preemptions == llm.engine.scheduler.num_preemptions - before == first  # the same run again
    assert llm.engine.state()["kv_blocks_used"] == 0 and llm.engine.state()["num_requests_waiting"] == 0


def test_both_decoders_refuse_a_context_past_a_sliding_window_alike():
    from transformers import MistralConfig, MistralForCausalLM

    from labkit import LabkitError
    from labkit.decode import StaticDecoder
    from labkit.serve import LLM

    cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=16)
    model = MistralForCausalLM(cfg).eval()
    with pytest.raises(LabkitError, match=r"max_model_len=64 is past the model's sliding window \(16\)"):
        LLM(model, None, block_size=4, max_model_len=64)
    with pytest.raises(LabkitError, match=r"max_len=64 is past the model's sliding window \(16\)"):
        StaticDecoder(model, max_len=64)
    LLM(model, None, block_size=4, max_model_len=16)  # within the window both serve it exactly
    StaticDecoder(model, max_len=16)


def test_decode_does_not_import_the_serving_package():
    import subprocess
    import sys

    code = "import sys, labkit.decode; print(any(m.startswith('labkit.serve') for m in sys.modules))"
    assert subprocess.check_output([sys.executable, "-c", code], text=True).strip() == "False"


def test_stacked_projections_are_registered_and_switchable(tiny_lm):
    from labkit.serve import LLM, SamplingParams

    stacked = LLM(tiny_lm, None, block_size=4, max_model_len=64)
    separate = LLM(tiny_lm, None, block_size=4, max_model_len=64, stack_projections=False)
    keys = set(stacked.engine.model.state_dict())
    assert any(k.startswith("qkv.0.parts.0.") for k in keys) and any(k.startswith("gate_up.0.parts.0.") for k in keys)
    assert [len(g) for g in stacked.engine.model.qkv] == [1] * len(tiny_lm.model.layers)  # one matmul a layer
    assert [len(g) for g in separate.engine.model.qkv] == [3] * len(tiny_lm.model.layers)
    moved = stacked.engine.model.to(torch.float64)  # .to() reaches the stacked copies too
    assert all(p.dtype == torch.float64 for p in moved.qkv.parameters())
    moved.to(torch.float32)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = [[5, 6, 7, 8], [9] * 7]
    assert [o.token_ids for o in stacked.generate(prompts, params, use_tqdm=False)] == \
        [o.token_ids for o in separate.generate(prompts, params, use_tqdm=False)]


def test_kv_telemetry_is_counted_only_when_asked():
    """Without record_history a step walks no block table: nothing is counted, and asking for the waste says how
    to get it; with it, the same schedule is counted."""
    ps = prompts([5, 9, 14])
    quiet = LLM(MODEL, None, block_size=4, max_model_len=64)
    quiet.generate(ps, GREEDY, use_tqdm=False)
    st_ = quiet.stats
    assert st_.steps > 0 and not st_.recorded and not st_.history and not st_.open_traces
    assert st_.reserved_slots == st_.pool_slot_steps == st_.used_slot_steps == 0
    with pytest.raises(LabkitError, match="record_history=True"):
        _ = st_.kv_waste_pct
    with pytest.raises(LabkitError, match="record_history=True"):
        st_.waste_breakdown_pct()
    loud = LLM(MODEL, None, block_size=4, max_model_len=64, record_history=True)
    loud.generate(ps, GREEDY, use_tqdm=False)
    assert loud.stats.steps == st_.steps and len(loud.stats.history) == st_.steps
    assert 0 < loud.stats.kv_waste_pct < 100


def test_dtype_auto_keeps_a_handed_in_model_and_a_mismatch_is_refused():
    llm = LLM(MODEL, None, max_model_len=32)
    assert llm.dtype == torch.float32 and llm.engine.kv.k[0].dtype == torch.float32
    with pytest.raises(ValueError, match=r"dtype='bfloat16' but the model handed in is float32: cast it first"):
        LLM(MODEL, None, max_model_len=32, dtype="bf16")
    with pytest.raises(ValueError, match=r"dtype='int8' is not allowed"):
        LLM(MODEL, None, max_model_len=32, dtype="int8")


@pytest.mark.parametrize("native", [True, False])
def test_dtype_auto_loads_a_named_model_in_bf16_only_where_native(monkeypatch, native):
    from labkit import env

    monkeypatch.setattr(env, "cpu_flags", lambda: ["avx2", "amx_bf16"] if native else ["avx2"])
    llm = LLM("smollm2-135m-random", device="cpu", max_model_len=32)
    want = torch.bfloat16 if native else torch.float32
    assert llm.dtype == want and next(llm.engine.model.hf.parameters()).dtype == want
    out = llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)[0]
    assert len(out.token_ids) == GREEDY.max_tokens
