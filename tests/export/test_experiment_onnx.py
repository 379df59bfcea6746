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
                         "ort-int8-dynamic-fused", "ort-int8-dynamic-per-tensor", "ort-fp32-unoptimized"]
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
