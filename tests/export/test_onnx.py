"""ONNX export parity, graph optimisation counts, ORT INT8 accuracy, providers and input checks."""

import numpy as np
import pytest
import torch

from labkit import LabkitError, data, evaluate
from labkit import export as X
from labkit.zoo import load_vision


@pytest.fixture(scope="module")
def cnn_onnx(tmp_path_factory):
    model = load_vision("digits-cnn", progress=False)
    return model, X.export_cnn(model, tmp_path_factory.mktemp("cnn") / "cnn.onnx")


@pytest.fixture(scope="module")
def encoder_onnx(minilm, tmp_path_factory):
    model, tok = minilm
    d = tmp_path_factory.mktemp("enc")
    path = X.export_encoder(model, tok, d / "minilm.onnx")
    b = tok(data.sentences()[:6], padding=True, return_tensors="pt")
    feeds = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    with torch.no_grad():
        ref = model(**feeds).last_hidden_state
    return model, path, feeds, ref, d


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_cnn_export_matches_pytorch_at_any_batch(exporter, tmp_path):
    model = load_vision("digits-cnn", progress=False)
    path = X.export_cnn(model, tmp_path / "cnn.onnx", exporter=exporter)
    sess = X.session(path)
    for n in (1, 5, 37):
        x = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            p = X.parity(model(x), X.run(sess, {"images": x})[0])
        assert p["max_abs_diff"] < 1e-4 and p["cosine"] > 0.99999
    assert not list(tmp_path.glob("*.onnx.tmp*")) and [f.name for f in tmp_path.iterdir()] == ["cnn.onnx"]


def test_encoder_export_parity_and_fusion(encoder_onnx):
    model, path, feeds, ref, d = encoder_onnx
    out = X.run(X.session(path), feeds)[0]
    p = X.parity(ref, out)
    assert p["max_abs_diff"] < 1e-3
    mask = feeds["attention_mask"]
    assert evaluate.cosine(X.mean_pool(out, mask), X.mean_pool(ref, mask)) > 0.9999
    fused = d / "fused.onnx"
    fusions = X.transformer_fuse(path, fused, num_heads=12, hidden_size=384)
    assert fusions.get("SkipLayerNormalization", 0) >= 6
    before, after = X.op_counts(path), X.op_counts(fused)
    assert (
        sum(after.values()) < sum(before.values())
        and after["SkipLayerNormalization"] == fusions["SkipLayerNormalization"]
    )
    p2 = X.parity(ref, X.run(X.session(fused), feeds)[0])
    assert p2["max_abs_diff"] < 1e-3
    levels = {lvl: sum(X.optimized_counts(path, lvl).values()) for lvl in ("disabled", "extended")}
    assert levels["extended"] < levels["disabled"]


def test_dynamic_int8_keeps_embeddings_and_shrinks_the_file(encoder_onnx):
    model, path, feeds, ref, d = encoder_onnx
    q = X.quantize_dynamic_int8(path, d / "int8.onnx")
    assert q.stat().st_size < 0.7 * path.stat().st_size
    assert X.op_counts(q)["DynamicQuantizeLinear"] > 0
    mask = feeds["attention_mask"]
    cos = evaluate.cosine(X.mean_pool(X.run(X.session(q), feeds)[0], mask), X.mean_pool(ref, mask))
    assert cos > 0.99
    prof = X.profile_ops(q, feeds, runs=1)
    assert prof and all(v >= 0 for v in prof.values())


def test_static_int8_qdq_on_the_cnn_keeps_accuracy(cnn_onnx, tmp_path):
    model, path = cnn_onnx
    splits = data.digits_splits()
    (xtr, _), (xte, yte) = splits["train"], splits["test"]
    calib = X.calibration_feeds(xtr, 4)
    q = X.quantize_static_int8(path, tmp_path / "int8.onnx", calib)
    counts = X.op_counts(q)
    assert counts["QuantizeLinear"] > 0 and counts["DequantizeLinear"] > 0
    acc = evaluate.accuracy(torch.from_numpy(X.run(X.session(q), {"images": xte})[0]), yte)
    assert acc >= evaluate.classifier_accuracy(model, xte, yte) - 0.02
    with pytest.raises(LabkitError, match="no batch"):
        X.quantize_static_int8(path, tmp_path / "x.onnx", [])


def test_session_input_checks(cnn_onnx):
    _, path = cnn_onnx
    sess = X.session(path)
    with pytest.raises(LabkitError, match=r"rank 3.*expects rank 4"):
        X.run(sess, {"images": np.zeros((2, 8, 8), np.float32)})
    with pytest.raises(LabkitError, match=r"float64; the model expects tensor\(float\)"):
        X.run(sess, {"images": np.zeros((2, 1, 8, 8))})
    with pytest.raises(LabkitError, match=r"do not match the session's \['images'\]"):
        X.run(sess, {"pixels": np.zeros((2, 1, 8, 8), np.float32)})
    with pytest.raises(LabkitError, match="level='max'"):
        X.session(path, level="max")


def test_providers():
    assert X.resolve_providers(["cpu"]) == ["CPUExecutionProvider"]
    assert "CPUExecutionProvider" in X.resolve_providers(None)
    if "CUDAExecutionProvider" not in X.available_providers():
        with pytest.raises(LabkitError, match=r"'cuda' is not available here.*onnxruntime-gpu"):
            X.resolve_providers(["cuda"])
    with pytest.raises(LabkitError, match="'npu' is not available"):
        X.resolve_providers(["npu"])


class DataDependent(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # a branch on a tensor value: torch.export refuses it
            return x * 2
        return x


def test_export_errors(tmp_path):
    with pytest.raises(LabkitError, match="exporter='onnx2'"):
        X.export_cnn(load_vision("digits-cnn", progress=False), tmp_path / "a.onnx", exporter="onnx2")
    with pytest.raises(LabkitError, match="could not export DataDependent.*exporter='torchscript'"):
        X.export(DataDependent(), (torch.ones(3, 4),), tmp_path / "b.onnx", input_names=["x"], output_names=["y"],
                 dynamic={"x": {0: "batch"}})
    with pytest.raises(LabkitError, match="needs at least 2"):
        X.export(torch.nn.Linear(4, 2), (torch.ones(1, 4),), tmp_path / "c.onnx", input_names=["x"],
                 output_names=["y"], dynamic={"x": {0: "batch"}})
    assert list(tmp_path.iterdir()) == []
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(LabkitError, match="bad.onnx is not a valid ONNX model"):
        X.check(bad)


@pytest.mark.gpu
def test_ort_cuda_with_io_binding(cnn_onnx):
    if "CUDAExecutionProvider" not in X.available_providers():
        pytest.skip("onnxruntime-gpu is not installed (this onnxruntime has the CPU provider only)")
    model, path = cnn_onnx
    x = torch.rand(16, 1, 8, 8, device="cuda")
    out = X.run_bound(X.session(path, providers=("cuda",)), {"images": x})[0]
    with torch.no_grad():
        assert torch.allclose(out.float().cpu(), model(x.cpu()), atol=1e-4)


def test_run_bound_returns_torch_tensors_through_dlpack_without_numpy(cnn_onnx, monkeypatch):
    import onnxruntime as ort

    model, path = cnn_onnx
    x = torch.rand(5, 1, 8, 8)[:, :, :, :]  # a view: run_bound keeps its contiguous copy alive for the run
    sess = X.session(path)
    monkeypatch.setattr(ort.OrtValue, "numpy", lambda self: pytest.fail("run_bound copied an output via numpy"))
    out = X.run_bound(sess, {"images": x.transpose(2, 3).transpose(2, 3)})[0]
    assert isinstance(out, torch.Tensor) and out.shape == (5, 10)
    with torch.no_grad():
        assert torch.allclose(out, model(x), atol=1e-5)


def test_a_provider_that_silently_fell_back_is_an_error():
    class FellBack:
        def get_providers(self):
            return ["CPUExecutionProvider"]

    with pytest.raises(LabkitError, match="asked for CUDAExecutionProvider but runs.*CPUExecutionProvider"):
        X.check_provider(FellBack(), "CUDAExecutionProvider")
    assert X.provider_options(["CUDAExecutionProvider", "CPUExecutionProvider"]) == [{"use_tf32": "0"}, {}]
    assert X.provider_options(["CUDAExecutionProvider"], tf32=True) == [{"use_tf32": "1"}]


def test_from_scratch_bias_gelu_fusion_finds_what_onnx_runtime_fuses(encoder_onnx):
    """labkit.export.fusion on the real MiniLM export: the five-node erf GELU collapses to Gelu, then every bias
    Add before it fuses, as many BiasGelu as ORT's transformer optimizer makes; the rewritten graph is consistent."""
    from labkit.export import fusion

    _, path, _, _, d = encoder_onnx
    nodes, consts, scalars, outs = fusion.graph_of(path)
    gelu = fusion.collapse_gelu(nodes, scalars, outs)
    assert fusion.node_counts(gelu)["Gelu"] == fusion.node_counts(nodes)["Erf"] == 6
    assert len(nodes) - len(gelu) == 4 * 6  # Div, Erf, Add, Mul gone per layer; the last Mul became the Gelu
    fused = fusion.fuse_bias_gelu(gelu, consts, outs)
    ort = X.transformer_fuse(path, d / "fused-bg.onnx", num_heads=12, hidden_size=384)
    assert fusion.node_counts(fused)["BiasGelu"] == ort["BiasGelu"] == 6 and "Gelu" not in fusion.node_counts(fused)
    produced = {n["output"] for n in nodes}
    seen = set()
    for n in fused:  # still topologically ordered, and nothing reads a value that was fused away
        assert all(i in seen or i not in produced for i in n["inputs"]), n
        seen.add(n["output"])
    assert set(outs) <= seen


def test_bias_gelu_fusion_leaves_illegal_patterns_alone():
    from labkit.export import fusion

    nodes = [{"op": "Add", "inputs": ["x", "b"], "output": "y"}, {"op": "Gelu", "inputs": ["y"], "output": "z"},
             {"op": "Add", "inputs": ["y", "z"], "output": "r"}]
    assert fusion.fuse_bias_gelu(nodes, {"b": (8,)}, ["r"]) == nodes  # y is read twice
    assert fusion.node_counts(fusion.fuse_bias_gelu(nodes[:2], {"b": (8,)}, ["z"]))["BiasGelu"] == 1
    assert fusion.fuse_bias_gelu(nodes[:2], {"b": (8, 8)}, ["z"]) == nodes[:2]  # not a bias


def test_variant_dtype_reads_the_number_format_from_the_name():
    from labkit import export as X

    assert [X.variant_dtype(n) for n in ("pytorch-fp32", "pytorch-bf16", "ort-int8-dynamic-fused", "ort-cuda-fp16",
                                         "torch-compile", "onnx-runtime-int8")] == \
        ["float32", "bfloat16", "int8", "float16", "float32", "int8"]
