"""Tensor parallelism in the paged engine: the shards add up to the model, k = 3 over gloo gives the tokens of
k = 1, the all-reduced bytes are the formula's, and a k that does not split the heads is refused by name."""

import pytest
import torch

from labkit.serve import LLM, SamplingParams
from labkit.serve.config import EngineConfig
from labkit.serve.tensor_parallel import allowed_sizes, check_size, shard
from tests.conftest import tiny_llama


def smol_shaped(seed: int = 0):
    """SmolLM2's head layout (9 query heads, 3 KV heads) at toy width: 2 layers, hidden 72."""
    return tiny_llama(seed, hidden_size=72, intermediate_size=144, num_attention_heads=9, num_key_value_heads=3)


def test_sizes_that_split_smollm2_are_named():
    from transformers import LlamaConfig

    from labkit.zoo import SMOLLM2_CONFIG

    cfg = LlamaConfig(**SMOLLM2_CONFIG)
    assert allowed_sizes(cfg) == [1, 3]
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 does not split this model evenly \(9 query heads, "
                                         r"3 KV heads, intermediate size 1536\); allowed: 1, 3"):
        check_size(cfg, 2)


def test_shards_add_up_to_the_model():
    model = smol_shaped()
    parts = [shard(model, r, 3) for r in range(3)]
    for i, layer in enumerate(model.model.layers):
        a = layer.self_attn
        for name, dim in (("q_proj", 0), ("k_proj", 0), ("v_proj", 0), ("o_proj", 1)):
            joined = torch.cat([getattr(p.model.layers[i].self_attn, name).weight for p in parts], dim)
            assert torch.equal(joined, getattr(a, name).weight), name
        for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            joined = torch.cat([getattr(p.model.layers[i].mlp, name).weight for p in parts], dim)
            assert torch.equal(joined, getattr(layer.mlp, name).weight), name
    assert parts[1].config.num_attention_heads == 3 and parts[1].config.num_key_value_heads == 1
    assert parts[1].config.head_dim == 8 and model.config.num_attention_heads == 9  # the original is untouched


@pytest.mark.parametrize("bad, match", [(0, "must be a positive integer"), (True, "must be a positive integer"),
                                        (1.5, "must be a positive integer")])
def test_bad_sizes_are_named(bad, match):
    with pytest.raises(ValueError, match=rf"tensor_parallel_size={bad!r} {match}"):
        EngineConfig(tensor_parallel_size=bad)
    with pytest.raises(ValueError, match="speculative_config with tensor_parallel_size > 1"):
        EngineConfig(tensor_parallel_size=3, speculative_config={"method": "ngram", "num_speculative_tokens": 2})


def test_a_size_that_does_not_split_the_heads_is_refused_before_any_process_starts():
    with pytest.raises(ValueError, match="tensor_parallel_size=2 does not split this model evenly"):
        LLM(smol_shaped(), None, tensor_parallel_size=2, max_model_len=64)


@pytest.mark.slow
def test_three_ranks_over_gloo_give_the_tokens_of_one():
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 49152, (n,), generator=g).tolist() for n in (5, 17, 9, 30)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    one = LLM(smol_shaped(), None, block_size=4, max_model_len=128)
    want = [o.token_ids for o in one.generate(prompts, params, use_tqdm=False)]
    with LLM(smol_shaped(), None, block_size=4, max_model_len=128, tensor_parallel_size=3) as three:
        got = [o.token_ids for o in three.generate(prompts, params, use_tqdm=False)]
        reducer = three.engine.tp.reducer
        steps = three.stats.steps
    assert got == want
    layers, hidden = 2, 72
    tokens = sum(len(p) + params.max_tokens - 1 for p in prompts)  # the last sampled token is never fed back
    assert reducer.calls == 2 * layers * steps  # one all-reduce after attention, one after the MLP, per layer
    assert reducer.bytes == 2 * layers * hidden * 4 * tokens  # each of hidden x fp32 bytes a token


@pytest.mark.gpu
def test_nccl_ranks_give_the_tokens_of_one():
    """NCCL between GPUs: k = 2 on a tiny Llama with 4 query and 2 KV heads (SmolLM2's layout needs 3 GPUs)."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"NCCL tensor parallelism needs 2 CUDA GPUs; this machine has {torch.cuda.device_count()}")
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    want = [o.token_ids for o in LLM(tiny_llama(0), None, device="cuda", max_model_len=64).generate(
        prompts, params, use_tqdm=False)]
    with LLM(tiny_llama(0), None, device="cuda", max_model_len=64, tensor_parallel_size=2) as two:
        assert [o.token_ids for o in two.generate(prompts, params, use_tqdm=False)] == want
