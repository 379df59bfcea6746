"""The int8 KV cache: bytes really drop, copy-on-write and preemption keep working, and greedy tokens mostly agree
with the model's own (int8 K/V is lossy: agreement is measured, not assumed)."""

import pytest
import torch

from labkit import LabkitError
from labkit.serve import LLM, SamplingParams
from labkit.serve.kv_cache import Int8KVCache, KVCache
from tests.conftest import tiny_llama
from tests.serve.test_engine import LENGTHS, hf_greedy, prompts, run


def test_int8_pool_holds_a_quarter_of_fp32s_bytes_plus_scales():
    fp = KVCache(2, 10, 4, 3, 64, torch.float32, "cpu")
    q = Int8KVCache(2, 10, 4, 3, 64, torch.float32, "cpu")
    assert q.nbytes / fp.nbytes == pytest.approx((64 + 2) / (64 * 4))  # one fp16 scale per 64 values
    bf = KVCache(2, 10, 4, 3, 64, torch.bfloat16, "cpu")
    assert bf.nbytes / q.nbytes == pytest.approx(128 / 66)  # about twice bf16's tokens in the same bytes


def test_int8_round_trip_is_close_and_copy_on_write_copies_scales():
    cache = Int8KVCache(1, 4, 2, 2, 16, torch.float32, "cpu")
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(3, 2, 16, generator=g) * 5, torch.randn(3, 2, 16, generator=g)
    cache.write(0, torch.tensor([0, 1, 2]), k, v)
    ck, cv = cache.gather(0, torch.tensor([[0, 1]]))
    for got, want in ((ck[0, :3], k), (cv[0, :3], v)):
        assert ((got - want).abs() <= want.abs().amax(-1, keepdim=True) / 254 * 1.01 + 1e-6).all()  # half a step
    cache.copy_block(0, 3)
    assert torch.equal(cache.gather(0, torch.tensor([[3]]))[0], cache.gather(0, torch.tensor([[0]]))[0])


def test_int8_engine_agrees_with_the_model_and_frees_every_block():
    ps = prompts(LENGTHS)
    outs, llm = run(ps, block_size=4, kv_cache_dtype="int8")
    assert isinstance(llm.engine.kv, Int8KVCache)
    same = sum(a == b for o, p in zip(outs, ps) for a, b in zip(o.token_ids, hf_greedy(p)))
    assert same / sum(len(o.token_ids) for o in outs) >= 0.9, same
    pre, llm2 = run(ps, block_size=4, num_blocks=20, max_num_seqs=8, max_model_len=64, kv_cache_dtype="int8")
    assert llm2.stats.preemptions > 0 and [o.token_ids for o in pre] == [o.token_ids for o in outs]


def test_parallel_sampling_on_an_int8_pool():
    llm = LLM(tiny_llama(seed=1), None, block_size=4, max_model_len=64, kv_cache_dtype="int8")
    out = llm.generate([list(range(3, 20))], SamplingParams(temperature=0.8, n=3, seed=1, max_tokens=6,
                                                          ignore_eos=True), use_tqdm=False)
    assert len(out[0].samples) == 3 and all(len(s.token_ids) == 6 for s in out[0].samples)
    assert llm.engine.bm.num_free == len(llm.engine.bm.blocks)


def test_unknown_kv_cache_dtype_is_named():
    with pytest.raises(LabkitError, match="kv_cache_dtype='fp8'; allowed: 'auto', 'int8'"):
        LLM(tiny_llama(seed=1), None, kv_cache_dtype="fp8")
