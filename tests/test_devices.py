"""Every experiment loads, trains and serves on its config's device — and says so explicitly.

Each experiment runs at its smallest size with the model loaders, ``train`` and the serving engine wrapped to record
the device they were given (tiny models of the same kinds stand in, so the whole sweep takes about a minute). A
loader called without a device would leave its model on the CPU on a GPU machine; here that is a failure even on a
CPU, where the wrong default happens to look right.
"""

from __future__ import annotations

import tempfile

import pytest
import torch

from labkit import LabkitError, env, experiments, zoo
from tests.conftest import tiny_llama

ALL = experiments.available()


def tiny_encoder():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512)
    return BertModel(cfg).eval()


@pytest.fixture
def recorded(monkeypatch):
    """Wrap every entry point that places a model; returns the list of (what, device given, device used)."""
    from transformers import AutoTokenizer

    import labkit.distill
    import labkit.quant.bnb as bnb
    import labkit.serve
    from labkit.capstone import experiment as capstone
    from labkit.distill import experiment as distillation
    from labkit.prune import experiment as pruning
    from labkit.serve import experiment_serving as serving

    calls: list[tuple[str, object, torch.device | None]] = []
    lm_tok = AutoTokenizer.from_pretrained(zoo._tokenizer_dir())
    lm_tok.pad_token = lm_tok.eos_token
    enc_tok = AutoTokenizer.from_pretrained(zoo._tokenizer_dir("minilm"))
    real_vision, real_train, real_llm, real_bnb_load = (
        zoo.load_vision,
        labkit.distill.train,
        labkit.serve.LLM,
        bnb._load,
    )

    def causal_lm(name="smollm2-135m", *, dtype=torch.float32, device=None, **kw):
        calls.append(("load_causal_lm", device, None))
        m = tiny_llama().to(dtype)
        m.labkit_card = zoo.MODELS[name]
        return (m.to(device) if device is not None else m), lm_tok

    def encoder(name="minilm-l6", *, dtype=torch.float32, device=None, **kw):
        calls.append(("load_encoder", device, None))
        m = tiny_encoder().to(dtype)
        m.labkit_card = zoo.MODELS[name]
        return (m.to(device) if device is not None else m), enc_tok

    def vision(name="digits-cnn", *, device=None, **kw):
        calls.append(("load_vision", device, None))
        return real_vision(name, device=device, **kw)

    def bnb_lm(name="smollm2-135m", mode="nf4", *, device=None, **kw):
        calls.append(("load_causal_lm_bnb", device, None))
        with tempfile.TemporaryDirectory() as d:
            tiny_llama().save_pretrained(d)
            lm_tok.save_pretrained(d)
            model, tok = real_bnb_load(d, mode, str(env.resolve_device(device)))
        model.labkit_card = zoo.MODELS[name]
        return model, tok

    def train(model, data, loss_fn, **kw):
        calls.append(("train", kw.get("device"), None))
        hist = real_train(model, data, loss_fn, **kw)
        calls.append(("train:model", next(model.parameters()).device, next(model.parameters()).device))
        return hist

    def llm(model, tokenizer=None, **kw):
        calls.append(("LLM", kw.get("device"), None))
        out = real_llm(model, tokenizer, **kw)
        calls.append(("LLM:model", next(out.engine.model.parameters()).device,
                      next(out.engine.model.parameters()).device))
        return out

    monkeypatch.setattr(zoo, "load_causal_lm", causal_lm)
    monkeypatch.setattr(zoo, "load_encoder", encoder)
    monkeypatch.setattr(zoo, "load_vision", vision)
    monkeypatch.setattr(bnb, "load_causal_lm_bnb", bnb_lm)
    for mod in (pruning, distillation, capstone):
        monkeypatch.setattr(mod, "train", train)
    monkeypatch.setattr(labkit.serve, "LLM", llm)
    monkeypatch.setattr(serving, "LLM", llm)
    return calls


DTYPES = ("float32", "bfloat16", "float16", "int8")


def smallest(name: str):
    return experiments.get(name).Config.smallest()


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_experiment_places_everything_on_its_config_device(name, recorded):
    cfg = smallest(name)
    assert cfg.device == str(env.default_device())  # the default is the machine's best device
    rec = experiments.get(name).run(cfg, progress=False)
    assert rec.variants
    for row in rec.variants:  # every measured row says the number format it ran in (projections are arithmetic)
        assert "(projected)" in row.get("model", "") or row.get("dtype") in DTYPES, (name, row["name"])
    want = torch.device(cfg.device)
    placed = [c for c in recorded if not c[0].endswith(":model")]
    assert placed, f"{name} loaded no model through the kit's loaders"
    for what, given, _ in placed:
        assert given is not None, f"{name}: {what} was called without a device (it would stay on the CPU on a GPU)"
        if not (name in ("onnx", "tensorrt") and what == "load_encoder"):  # exported from the CPU by design
            assert torch.device(given) == want, f"{name}: {what} got device {given}, config says {cfg.device}"
    for what, used, _ in (c for c in recorded if c[0].endswith(":model")):
        assert torch.device(used).type == want.type, f"{name}: {what} ran on {used}, config says {cfg.device}"


def test_every_experiment_has_a_device_field_and_smallest_sizes():
    for name in ALL:
        mod = experiments.get(name)
        assert "device" in mod.Config.__dataclass_fields__, name
        assert mod.Config.smallest().device == mod.Config.quick().device == str(env.default_device())


@pytest.mark.parametrize("bad, why", [("cuda", "no CUDA GPU"), ("cuda:3", "no CUDA GPU"), ("tpu", "not a device"),
                                      ("meta", "not a device labkit")])
def test_a_device_this_machine_lacks_is_a_clear_error(bad, why):
    if torch.cuda.is_available() and bad.startswith("cuda"):
        bad, why = f"cuda:{torch.cuda.device_count()}", "CUDA GPU"
    with pytest.raises(LabkitError, match=why) as err:
        env.resolve_device(bad)
    assert repr(bad) in str(err.value) and "allowed here: cpu" in str(err.value)
    assert isinstance(err.value, ValueError)
    cfg = experiments.get("baseline").Config.smallest()
    cfg.device = bad
    with pytest.raises(LabkitError, match=why):
        experiments.get("baseline").run(cfg, progress=False)
