import pytest
import torch

from labkit import LabkitError, zoo
from labkit.measure import param_count, weight_bytes

SMOLLM2_PARAMS = 134_515_008


def test_unknown_model_lists_known_names():
    with pytest.raises(LabkitError, match="known causal-lm names: smollm2-135m, smollm2-135m-random"):
        zoo.load_causal_lm("gpt-5")


def test_bad_source_is_rejected():
    with pytest.raises(LabkitError, match="source='ftp'"):
        zoo.load_causal_lm("smollm2-135m-random", source="ftp")


def test_checksum_mismatch_names_file_and_fix(tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"not a model")
    with pytest.raises(LabkitError, match=r"checksum mismatch for .*x\.gguf.*labkit fetch"):
        zoo.verify_sha256(f, zoo.SMOLLM2_GGUF_SHA256)


def test_hub_offline_names_offline_default(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LabkitError, match="offline default 'smollm2-135m'"):
        zoo.load_causal_lm("smollm2-135m", source="hub")


def test_random_model_has_smollm2_shape_and_is_seeded():
    m1, tok = zoo.load_causal_lm("smollm2-135m-random")
    m2, _ = zoo.load_causal_lm("smollm2-135m-random")
    assert param_count(m1) == SMOLLM2_PARAMS
    assert m1.labkit_card.name == "smollm2-135m-random"
    assert torch.equal(m1.model.layers[3].mlp.up_proj.weight, m2.model.layers[3].mlp.up_proj.weight)
    assert tok("hello world")["input_ids"] == [28120, 905]


def test_real_smollm2_loads_with_provenance(smollm2):
    model, tok = smollm2
    assert param_count(model) == SMOLLM2_PARAMS
    assert abs(weight_bytes(model) - SMOLLM2_PARAMS * 4) / (SMOLLM2_PARAMS * 4) < 0.01
    assert "Q4_1" in model.labkit_card.notes
    assert zoo.sha256_file(zoo.cache_dir() / "smollm2-135m" / zoo.SMOLLM2_GGUF) == zoo.SMOLLM2_GGUF_SHA256
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_minilm_loads_from_pypi_package(minilm):
    model, _ = minilm
    assert param_count(model) == 22_713_216


@pytest.mark.slow
def test_digits_cnn_trains_deterministically_and_is_accurate(tmp_path, monkeypatch):
    from labkit.data import digits_splits
    from labkit.evaluate import classifier_accuracy

    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path))
    a = zoo.load_vision("digits-cnn", progress=False)
    b = zoo.train_digits_cnn(progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert (tmp_path / "digits-cnn" / "model.safetensors").exists()
    x, y = digits_splits()["test"]
    assert classifier_accuracy(a, x, y) > 0.95


def test_random_llm_depth_is_checked(monkeypatch):
    monkeypatch.setenv("LABKIT_RANDOM_LAYERS", "2")
    assert zoo.random_llm_layers() == 2
    for bad in ("0", "31", "two"):
        monkeypatch.setenv("LABKIT_RANDOM_LAYERS", bad)
        with pytest.raises(LabkitError, match=f"LABKIT_RANDOM_LAYERS='{bad}' must be an integer in 1..30"):
            zoo.random_llm_layers()
    monkeypatch.delenv("LABKIT_RANDOM_LAYERS")
    assert zoo.random_llm_layers() == 30
