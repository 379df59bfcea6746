"""The ONNX experiment at a small size: every variant and field the record promises."""

import pytest

from labkit.export import experiment_onnx as onnx


@pytest.mark.slow
def test_onnx_experiment_small():
    cfg = onnx.Config.quick()
    cfg.repeats, cfg.batch, cfg.seq_len, cfg.torch_compile, cfg.profile_runs = 3, 4, 32, False, 1
    rec = onnx.run(cfg, progress=False)
    enc = {v["name"]: v for v in rec.variants if v["model"] == "minilm-l6"}
    assert list(enc) == ["pytorch-fp32", "pytorch-bf16", "ort-fp32", "ort-fp32-fused", "ort-int8-dynamic",
                         "ort-int8-dynamic-fused", "ort-int8-dynamic-per-tensor", "ort-int8-static",
                         "ort-fp32-unoptimized"]
    assert enc["ort-int8-static"]["dtype"] == "int8" and enc["pytorch-bf16"]["dtype"] == "bfloat16"
    assert enc["ort-int8-static"]["cosine_to_reference"] > 0.9  # ranges fixed from other sentences cost accuracy
    assert enc["ort-fp32-unoptimized"]["cosine_to_reference"] > 0.9999  # optimisations change no result
    for v in rec.variants:
        for key in ("latency_ms_median", "latency_ms_iqr", "speedup_vs_baseline", "weight_bytes", "graph_nodes"):
            assert key in v, (v["name"], key)
    assert enc["ort-fp32"]["cosine_to_reference"] > 0.9999
    assert enc["ort-int8-dynamic"]["cosine_to_reference"] > 0.99
    assert enc["ort-int8-dynamic"]["weight_bytes"] < 0.7 * enc["ort-fp32"]["weight_bytes"]
    assert enc["ort-fp32-fused"]["graph_nodes"] < enc["ort-fp32"]["graph_nodes"]
    cnn = {v["name"]: v for v in rec.variants if v["model"] == "digits-cnn"}
    assert list(cnn) == ["pytorch-fp32", "ort-fp32", "ort-int8-static"]
    assert cnn["ort-fp32"]["accuracy"] == cnn["pytorch-fp32"]["accuracy"]
    assert cnn["ort-int8-static"]["accuracy"] > cnn["pytorch-fp32"]["accuracy"] - 0.02
    assert set(rec.config["ort_level_nodes"]) == {"disabled", "basic", "extended", "all"}
    assert "MatMul" in rec.config["op_ms_per_call"]["ort-fp32"]
    t = rec.config["targets"]
    assert t["ort-fp32 cosine_to_reference"]["ok"]
    said = onnx.format_sentence(rec)  # which reduced format pays here, from the record's own numbers
    assert f"{enc['pytorch-bf16']['speedup_vs_baseline']:.2f}x" in said and "INT8" in said


@pytest.mark.parametrize("int8, bf16, verdict", [
    (1.9, 1.4, "INT8 pays most here"),
    (0.96, 2.39, "INT8 does not pay here and bf16 does, so bf16 is this machine's reduced format"),
    (1.3, 2.0, "both pay, bf16 more")])
def test_the_format_sentence_follows_the_record(int8, bf16, verdict):
    from labkit.results import Record

    rec = Record("onnx", env={"cpu": "some CPU", "cpu_flags": ["avx2", "avx512_bf16"]})
    rec.config = {"encoder": "minilm-l6"}
    rec.add("pytorch-fp32", model="minilm-l6", speedup_vs_baseline=1.0, cosine_to_reference=1.0)
    rec.add("pytorch-bf16", model="minilm-l6", speedup_vs_baseline=bf16, cosine_to_reference=0.9999)
    rec.add("ort-int8-dynamic", model="minilm-l6", speedup_vs_baseline=int8, cosine_to_reference=0.993)
    said = onnx.format_sentence(rec)
    assert said.endswith(verdict) and "avx512_bf16" in said and f"{int8:.2f}x" in said
    assert onnx.check(rec, onnx.TARGETS)[
        "best reduced format (INT8 ORT or PyTorch bf16) speedup_vs_baseline"]["value"] == max(int8, bf16)
