"""labkit.prepack: packed weights compute what F.linear computes, and the engine and decoder give the same tokens."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from labkit import prepack
from labkit.decode import StaticDecoder
from labkit.serve import LLM, SamplingParams
from labkit.serve.config import EngineConfig
from tests.conftest import tiny_llama

pytestmark = pytest.mark.skipif(not prepack.available(), reason="this torch build has no oneDNN packed linear")
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.integers(1, 9), st.booleans(),
       st.sampled_from([torch.float32, torch.bfloat16]))
def test_packed_linear_computes_f_linear(n_in, n_out, rows, bias, dtype):
    torch.manual_seed(n_in * 1000 + n_out)
    lin = nn.Linear(n_in, n_out, bias=bias).to(dtype)
    x = torch.randn(2, rows, n_in, dtype=dtype)
    packed = prepack.PackedLinear(lin)
    want = F.linear(x, lin.weight, lin.bias)
    got = packed(x)
    assert got.shape == want.shape and got.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert torch.allclose(got.float(), want.float(), **tol)
    assert torch.equal(packed.weight, lin.weight.detach())  # the layout changes, not the values
    assert packed.nbytes >= lin.weight.nbytes
    assert torch.equal(packed.direct(dtype)(x), got)  # the plain function the static decoder calls: the same
    assert packed.direct(torch.float16) is None  # another dtype: forward casts, direct does not


def test_an_input_in_another_dtype_is_cast_in_and_back():
    lin = nn.Linear(16, 8)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    out = prepack.PackedLinear(lin)(x)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), F.linear(x.float(), lin.weight, lin.bias), atol=3e-2)


def prompts(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 49152, (5 + 7 * i,), generator=g).tolist() for i in range(n)]


def serve(model, **kw):
    llm = LLM(model, None, max_model_len=96, **kw)
    return [o.token_ids for o in llm.generate(prompts(), GREEDY, use_tqdm=False)], llm


@pytest.mark.parametrize("stack", [True, False])
def test_engine_with_packed_weights_gives_the_same_tokens_and_leaves_the_model(stack):
    model = tiny_llama(seed=3)
    plain, _ = serve(model, stack_projections=stack)
    packed, llm = serve(model, stack_projections=stack, prepack_weights=True)
    assert packed == plain
    assert type(model.model.layers[0].self_attn.o_proj) is nn.Linear and type(model.lm_head) is nn.Linear
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear  # unstacked parts are packed as copies too
    assert len(llm.engine.model.packer.packed) == 2 * model.config.num_hidden_layers + 1
    bm = llm.engine.bm
    assert bm.num_free == len(bm.blocks)


def test_bf16_engine_with_packed_weights_agrees_with_the_unpacked_one():
    from labkit.evaluate import token_agreement

    model = tiny_llama(seed=4).to(torch.bfloat16)
    plain, _ = serve(model)
    packed, _ = serve(model, prepack_weights=True)
    assert token_agreement(packed, plain) >= 0.9


def test_static_decoder_with_packed_weights_matches_hf():
    model = tiny_llama(seed=5)
    ids = torch.randint(3, 49152, (1, 9), generator=torch.Generator().manual_seed(1))
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, min_new_tokens=10,
                         do_sample=False)[:, 9:]
    assert torch.equal(StaticDecoder(model, max_len=32, prepack=True).generate(ids, 10), ref)


def test_where_packing_cannot_run_the_error_says_so():
    with pytest.raises(ValueError, match="prepack_weights=True on device='cuda'"):
        prepack.check("cuda", torch.float32)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        prepack.check("cpu", torch.float16)
    with pytest.raises(ValueError, match="tensor_parallel_size > 1"):
        EngineConfig(prepack_weights=True, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="packs nn.Linear"):
        prepack.PackedLinear(nn.Conv1d(2, 2, 1))
