"""Structured pruning: real shapes, parameter counts, forward passes, GQA consistency and reloads."""

import copy

import pytest
import torch

from labkit import LabkitError, data, measure, prune
from labkit.zoo import DigitsCNN, load_vision
from tests.conftest import tiny_llama


@pytest.fixture
def cnn():
    return copy.deepcopy(load_vision("digits-cnn", progress=False))


@pytest.mark.parametrize("importance", ["l2", "l1", "taylor", "random"])
def test_cnn_channels_really_go(cnn, importance):
    x, y = data.digits_splits()["train"]
    res = prune.prune_cnn(cnn, 0.4, importance_name=importance, calibration=(x[:128], y[:128]))
    # torch-pruning keeps int(n * (1 - ratio)): 16 -> 9, 32 -> 19, hidden 32 -> 19; the 10 classes stay
    assert cnn.features[0].weight.shape == (9, 1, 3, 3)
    assert cnn.features[2].weight.shape == (19, 9, 3, 3)
    assert cnn.classifier[1].weight.shape == (19, 19 * 16) and cnn.classifier[3].weight.shape == (10, 19)
    expected = 9 * 9 + 9 + 19 * 9 * 9 + 19 + 19 * 304 + 19 + 10 * 19 + 10
    assert res.params_after == measure.param_count(cnn) == expected
    assert res.params_before == measure.param_count(DigitsCNN())
    assert res.macs_after < 0.5 * res.macs_before
    assert measure.weight_bytes(cnn) == 4 * expected
    assert cnn(torch.rand(3, 1, 8, 8)).shape == (3, 10)
    assert set(res.layers) == {"features.0", "features.2", "classifier.1", "classifier.3"}


def test_pruned_cnn_saves_and_reloads_with_its_shape(cnn, tmp_path):
    prune.prune_cnn(cnn, 0.5)
    path = tmp_path / "pruned.safetensors"
    prune.save_pruned(cnn, path)
    x = torch.rand(4, 1, 8, 8)
    with pytest.raises(RuntimeError, match="size mismatch"):  # the usual failure, which resize_to_state_dict avoids
        from safetensors.torch import load_file
        DigitsCNN().load_state_dict(load_file(path))
    back = prune.load_pruned(path, DigitsCNN())
    assert torch.equal(back(x), cnn.eval()(x))
    assert back.classifier[1].in_features == cnn.classifier[1].in_features
    with pytest.raises(LabkitError, match="pass model="):
        prune.load_pruned(path)


def test_ratio_that_empties_a_layer_is_refused(cnn):
    with pytest.raises(LabkitError, match=r"remove every one of the .* 'features.0'"):
        prune.prune_channels(cnn, torch.zeros(1, 1, 8, 8), 0.5, round_to=16, ignored_layers=[cnn.classifier[3]])
    with pytest.raises(ValueError, match=r"ratio=1.0"):
        prune.prune_cnn(cnn, 1.0)


def test_unknown_importance_and_untraceable_model(cnn):
    with pytest.raises(LabkitError, match="importance='fisher' does not exist"):
        prune.prune_cnn(cnn, 0.3, importance_name="fisher")
    with pytest.raises(LabkitError, match="taylor' needs calibration"):
        prune.prune_cnn(cnn, 0.3, importance_name="taylor")
    with pytest.raises(LabkitError, match="could not trace"):
        prune.prune_channels(cnn, torch.zeros(1, 3, 8, 8), 0.3, ignored_layers=[cnn.classifier[3]])


def test_llm_mlp_pruning_updates_config_and_reloads(tmp_path):
    lm = tiny_llama()
    ids = torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(0))
    res = prune.prune_llm_mlp(lm, 0.3, calibration_ids=ids)
    # 128 channels: int(128 * 0.7) = 89, rounded down to a multiple of 8 -> 88 kept
    assert lm.config.intermediate_size == 88
    for layer in lm.model.layers:
        assert layer.mlp.gate_proj.weight.shape == (88, 64) and layer.mlp.up_proj.weight.shape == (88, 64)
        assert layer.mlp.down_proj.weight.shape == (64, 88)
        assert layer.self_attn.q_proj.weight.shape == (64, 64)  # attention untouched
    assert res.params_before - res.params_after == 2 * 3 * 64 * 40
    out = lm.generate(ids[:1, :4], max_new_tokens=5, do_sample=False, use_cache=True)
    assert out.shape == (1, 9)
    prune.save_pruned(lm, tmp_path / "lm")
    back = prune.load_pruned(tmp_path / "lm")
    assert back.config.intermediate_size == 88
    assert torch.allclose(back(input_ids=ids).logits, lm(input_ids=ids).logits, atol=1e-5)


def test_gqa_heads_go_by_whole_groups_and_reload(tmp_path):
    lm = tiny_llama(num_attention_heads=8, num_key_value_heads=2, hidden_size=64)  # head_dim 8, 4 query heads/group
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    before = lm(input_ids=ids).logits
    res = prune.prune_attention_heads(lm, 0.5, calibration_ids=ids)
    assert lm.config.num_attention_heads == 4 and lm.config.num_key_value_heads == 2 and lm.config.head_dim == 8
    for layer in lm.model.layers:
        attn = layer.self_attn
        assert attn.q_proj.weight.shape == (4 * 8, 64) and attn.o_proj.weight.shape == (64, 4 * 8)
        assert attn.k_proj.weight.shape == (2 * 8, 64) and attn.num_key_value_groups == 2
    assert res.params_before - res.params_after == 2 * 2 * (4 * 8 * 64)
    after = lm(input_ids=ids).logits
    assert after.shape == before.shape and not torch.allclose(after, before)
    prune.save_pruned(lm, tmp_path / "heads")
    back = prune.load_pruned(tmp_path / "heads")
    assert torch.allclose(back(input_ids=ids).logits, after, atol=1e-5)


def test_head_pruning_keeps_the_right_heads_by_l2():
    lm = tiny_llama(num_attention_heads=4, num_key_value_heads=2)  # head_dim 16, 2 query heads per group
    with torch.no_grad():
        q = lm.model.layers[0].self_attn.q_proj.weight
        q[0:16] *= 0.01  # head 0 (group 0) and head 3 (group 1) are tiny
        q[48:64] *= 0.01
        kept = torch.cat([q[16:32], q[32:48]]).clone()
    prune.prune_attention_heads(lm, 0.5, importance_name="l2")
    assert torch.equal(lm.model.layers[0].self_attn.q_proj.weight, kept)


@pytest.mark.parametrize("ratio", [0.3, 0.99])
def test_gqa_ratio_that_splits_heads_is_refused(ratio):
    with pytest.raises(LabkitError, match=r"heads must stay whole.*allowed ratios are 0/3, 1/3, 2/3"):
        prune.heads_to_remove(9, 3, ratio)
    assert prune.heads_to_remove(9, 3, 2 / 3) == 2


def test_not_a_llama_is_refused(cnn):
    with pytest.raises(LabkitError, match="not a Llama-shaped"):
        prune.prune_llm_mlp(cnn, 0.3)


@pytest.mark.slow
def test_real_smollm2_mlp_prune_is_smaller_and_generates(smollm2, tmp_path):
    model, tok = smollm2
    lm = copy.deepcopy(model)
    calib = data.calibration_batches(tok, n=2, seq_len=64)
    res = prune.prune_llm_mlp(lm, 0.3, calibration_ids=calib)
    assert lm.config.intermediate_size == 1072 and res.params_after == res.params_before - 30 * 3 * 576 * 464
    prompt = tok("The Python interpreter", return_tensors="pt").input_ids
    out = lm.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape[1] == prompt.shape[1] + 6
    prune.save_pruned(lm, tmp_path / "smol")
    back = prune.load_pruned(tmp_path / "smol")
    assert measure.param_count(back) == res.params_after


def test_a_heads_l2_score_is_the_norm_of_its_query_rows_and_output_columns_together():
    from labkit.prune.structured import _head_scores

    torch.manual_seed(0)
    h, d, hidden = 4, 8, 32
    wq, wo = torch.randn(h * d, hidden), torch.randn(hidden, h * d)
    got = _head_scores(wq, wo, h, d, "l2")
    for i in range(h):
        rows, cols = wq[i * d:(i + 1) * d], wo[:, i * d:(i + 1) * d]
        assert got[i] == pytest.approx(torch.cat([rows.flatten(), cols.flatten()]).norm().item(), rel=1e-5)
