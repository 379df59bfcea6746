"""StaticDecoder: the lean decode loop computes the model HF computes."""

import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from labkit import LabkitError
from labkit.decode import StaticDecoder
from labkit.quant import api
from tests.conftest import tiny_llama


def hf_greedy(model, ids, n):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False)
    return out[:, ids.shape[1]:]


def prompt(batch=1, length=12, seed=0):
    return torch.randint(3, 49152, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_tokens_equal_hf_generate(batch):
    model = tiny_llama(seed=3)
    ids = prompt(batch)
    assert torch.equal(StaticDecoder(model, batch=batch, max_len=64).generate(ids, 20), hf_greedy(model, ids, 20))


@settings(max_examples=8, deadline=None)
@given(split=st.integers(1, 11), seed=st.integers(0, 5))
def test_prefill_in_chunks_equals_one_prefill(split, seed):
    model = tiny_llama(seed=1)
    ids = prompt(length=12, seed=seed)
    whole = StaticDecoder(model, max_len=32).forward(ids)
    d = StaticDecoder(model, max_len=32)
    d.forward(ids[:, :split])
    assert torch.allclose(d.forward(ids[:, split:]), whole, atol=1e-5)


def test_logits_match_hf_forward():
    model = tiny_llama(seed=4)
    ids = prompt(length=9)
    with torch.no_grad():
        ref = model(ids).logits[:, -1]
    assert torch.allclose(StaticDecoder(model, max_len=16).forward(ids), ref, atol=1e-5)


@pytest.mark.parametrize("config", [api.Int8Config(), api.Int4Config(group_size=32)], ids=["int8", "int4"])
def test_quantized_layers_run_unchanged(config):
    """Fused int8/int4 layers: fp32 activations give HF's tokens; bf16 activations (no casts around each
    projection) give nearly the same logits."""
    model = tiny_llama(seed=5)
    api.quantize_(model, config)
    ids = prompt()
    fp32 = StaticDecoder(model, max_len=48, dtype=torch.float32)
    assert torch.equal(fp32.generate(ids, 16), hf_greedy(model, ids, 16))
    with torch.no_grad():
        ref = model(ids).logits[:, -1]
    assert torch.allclose(StaticDecoder(model, max_len=48, dtype=torch.float32).forward(ids), ref, atol=1e-4)
    got = StaticDecoder(model, max_len=48).forward(ids).float()  # "auto": the kernels' bf16
    assert F.cosine_similarity(got, ref).item() > 0.99


def test_bad_input_is_named():
    model = tiny_llama()
    with pytest.raises(LabkitError, match="model_type='gpt2'"):
        StaticDecoder(types.SimpleNamespace(config=types.SimpleNamespace(model_type="gpt2")))
    with pytest.raises(LabkitError, match="batch=0"):
        StaticDecoder(model, batch=0)
    d = StaticDecoder(model, max_len=8)
    with pytest.raises(LabkitError, match="max_len=8"):
        d.forward(prompt(length=9))
    with pytest.raises(LabkitError, match="batch=1"):
        d.forward(prompt(batch=2, length=3))


def test_decode_step_times_takes_the_static_loop():
    from labkit import measure

    model = tiny_llama()
    assert measure.decode_step_times(model, prompt_len=4, new_tokens=3, loop="static")() > 0
    with pytest.raises(LabkitError, match="loop='compiled'"):
        measure.decode_step_times(model, loop="compiled")


def test_auto_dtype_is_what_the_projections_compute_in():
    from labkit.measure import compute_dtype

    model = tiny_llama()
    assert StaticDecoder(model, max_len=8).dtype == torch.float32
    fused = tiny_llama()
    api.quantize_(fused, api.Int8Config(kernel="fused"))
    assert compute_dtype(fused) == torch.bfloat16 and StaticDecoder(fused, max_len=8).dtype == torch.bfloat16
    assert StaticDecoder(model, max_len=8, dtype="bf16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype='int4' is not allowed"):
        StaticDecoder(model, max_len=8, dtype="int4")
