"""TensorRT: a clear reason where it cannot run; engine build/run/reload where it can (GPU tests)."""

import pytest
import torch

from labkit import LabkitError
from labkit import export as X
from labkit.export import tensorrt as T
from labkit.zoo import load_vision


def test_without_tensorrt_every_entry_point_says_what_is_missing(tmp_path):
    ok, why = T.support()
    if ok:
        pytest.skip(f"TensorRT is available here: {why}")
    assert "GPU" in why or "tensorrt-cu12" in why
    with pytest.raises(LabkitError, match="TensorRT is not available here"):
        T.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", shapes={})
    with pytest.raises(LabkitError, match="TensorRT is not available here"):
        T.Engine(tmp_path / "m.engine")


def test_tensorrt_experiment_writes_an_honest_record_anywhere():
    from labkit.export import experiment_tensorrt as tensorrt

    ok, _ = T.support()
    if ok:
        pytest.skip("TensorRT present: the GPU test covers the full run")
    cfg = tensorrt.Config.quick()
    cfg.repeats, cfg.batch, cfg.seq_len = 3, 2, 32
    rec = tensorrt.run(cfg, progress=False)
    assert rec.config["status"] == "skipped" and rec.config["reason"]
    names = [v["name"] for v in rec.variants]
    assert names == ["pytorch-fp32", "torch-compile", "ort-fp32", "ort-fp32-fused"]
    assert all(v["cosine_to_reference"] > 0.9999 for v in rec.variants)


@pytest.mark.gpu
def test_engine_build_run_reload(tmp_path):
    ok, why = T.support()
    if not ok:
        pytest.skip(why)
    model = load_vision("digits-cnn", progress=False)
    path = X.export_cnn(model, tmp_path / "cnn.onnx")
    shapes = {"images": ((1, 1, 8, 8), (64, 1, 8, 8), (256, 1, 8, 8))}
    for fp16 in (False, True):
        engine_path = T.build_engine(path, tmp_path / f"cnn-{fp16}.engine", shapes=shapes, fp16=fp16)
        engine = T.Engine(engine_path)  # reloaded from the serialised file
        x = torch.rand(32, 1, 8, 8)
        out = engine(images=x.cuda())[0].float().cpu()
        with torch.no_grad():
            ref = model(x)
        assert torch.allclose(out, ref, atol=5e-2 if fp16 else 1e-3)
        assert (out.argmax(1) == ref.argmax(1)).float().mean() > 0.95
