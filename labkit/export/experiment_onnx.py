"""ONNX Runtime vs PyTorch on the same inputs: export, graph optimisation, INT8 — and what each step buys.

``minilm-l6`` at batch 8 x 128 tokens (real sentences, padded): PyTorch fp32 (the baseline), bf16 autocast,
``torch.compile``, ORT fp32 (its own optimisations at level "all"), ORT after the transformer optimizer's offline
fusions, dynamic INT8 (per-channel MatMul weights) on each graph, and on a GPU ORT CUDA fp16. ``digits-cnn`` at batch
256: PyTorch, ORT fp32, static INT8 (QDQ, calibrated on training images). All timed in one process in rotated rounds.

``device``: the CPU comparison (PyTorch vs ORT's CPU provider) always runs on the CPU, where ORT's CPU provider
works; with ``device="cuda"`` (the default on a GPU) the CUDA rows are added on that GPU.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from labkit import LabkitError, data, env, evaluate, measure, zoo
from labkit import export as X
from labkit.experiments.protocol import Target, check
from labkit.results import Record

NAME = "onnx"  # `labkit run onnx`
NOTEBOOK = "04_onnx_runtime"


@dataclass
class Config:
    encoder: str = "minilm-l6"
    batch: int = 8
    seq_len: int = 128
    cnn: str = "digits-cnn"
    cnn_batch: int = 256
    calibration_batches: int = 8
    repeats: int = 7
    exporter: str = "dynamo"
    torch_compile: bool = True
    profile_runs: int = 5
    device: str = env.device_field()

    @classmethod
    def quick(cls) -> Config:
        return cls(repeats=5, profile_runs=3)

    @classmethod
    def smallest(cls) -> Config:
        """Every code path at the least work (the GPU check's rehearsal and the device tests)."""
        return cls(batch=2, seq_len=16, cnn_batch=16, calibration_batches=1, repeats=1, torch_compile=False,
                   profile_runs=1)


def encoder_inputs(tok, config: Config) -> dict[str, torch.Tensor]:
    """``batch`` real sentences padded to ``seq_len`` tokens (the sentence list repeats if it is short)."""
    sents = (data.sentences() * (config.batch // len(data.sentences()) + 1))[:config.batch]
    b = tok(sents, padding="max_length", truncation=True, max_length=config.seq_len, return_tensors="pt")
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}


def _calibration_feeds(tok, config: Config) -> dict:
    """One batch of the held-out sentences in reverse order (not the timed batch), as host arrays."""
    sents = list(reversed(data.sentences()))
    sents = (sents * (config.batch // len(sents) + 1))[:config.batch]
    b = tok(sents, padding="max_length", truncation=True, max_length=config.seq_len, return_tensors="np")
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}


def _pytorch_fns(model, feeds, config: Config) -> dict:
    def fp32():
        return model(**feeds).last_hidden_state

    def bf16():
        with torch.autocast(feeds["input_ids"].device.type, dtype=torch.bfloat16):
            return model(**feeds).last_hidden_state

    fns = {"pytorch-fp32": fp32, "pytorch-bf16": bf16}
    if config.torch_compile:
        compiled = torch.compile(model)
        fns["torch-compile"] = lambda: compiled(**feeds).last_hidden_state
    return fns


def run(config: Config | None = None, progress: bool = True) -> Record:
    config = config or Config()
    dev = env.resolve_device(config.device)
    rec = Record("onnx", env=env.describe())
    bar = tqdm(total=2, desc="onnx: minilm, then digits-cnn (export, quantize, time)", disable=not progress)
    with tempfile.TemporaryDirectory() as d:
        extra = _encoder(rec, config, Path(d), dev)
        bar.update(1)
        extra.update(_cnn(rec, config, Path(d)))
        bar.update(1)
    bar.close()
    rec.config = {**asdict(config), **extra}
    rec.config["targets"] = check(rec, TARGETS)
    return rec


def _encoder(rec: Record, config: Config, d: Path, dev: torch.device) -> dict:
    model, tok = zoo.load_encoder(config.encoder, device="cpu")  # the CPU comparison; CUDA rows below
    feeds = encoder_inputs(tok, config)
    t0 = time.perf_counter()
    path = X.export_encoder(model, tok, d / "minilm.onnx", exporter=config.exporter)
    export_s = time.perf_counter() - t0
    fused = d / "minilm-fused.onnx"
    fusions = X.transformer_fuse(path, fused, num_heads=model.config.num_attention_heads,
                                 hidden_size=model.config.hidden_size)
    files = {"ort-fp32": path, "ort-fp32-fused": fused,
             "ort-int8-dynamic": X.quantize_dynamic_int8(path, d / "minilm-int8.onnx"),
             "ort-int8-dynamic-fused": X.quantize_dynamic_int8(fused, d / "minilm-fused-int8.onnx"),
             "ort-int8-dynamic-per-tensor": X.quantize_dynamic_int8(path, d / "minilm-int8-pt.onnx",
                                                                    per_channel=False),
             # static INT8 (QDQ): activation ranges fixed from other sentences than the timed ones
             "ort-int8-static": X.quantize_static_int8(path, d / "minilm-int8-static.onnx",
                                                       [_calibration_feeds(tok, config)], op_types=("MatMul",))}
    sessions = {k: X.session(p) for k, p in files.items()}  # ORT's own optimisations at level "all"
    files["ort-fp32-unoptimized"] = path  # the same graph with every online optimisation off: what "all" buys
    sessions["ort-fp32-unoptimized"] = X.session(path, level="disabled")
    np_feeds = {k: v.numpy() for k, v in feeds.items()}
    with torch.no_grad():
        fns = _pytorch_fns(model, feeds, config)
        ref = X.mean_pool(fns["pytorch-fp32"](), feeds["attention_mask"])
        outs = {k: fn() for k, fn in fns.items()}  # also compiles torch.compile, outside the clock
        fns.update({k: (lambda s=s: s.run(None, np_feeds)) for k, s in sessions.items()})
        outs.update({k: torch.from_numpy(X.run(s, feeds)[0]) for k, s in sessions.items()})
        lat = measure.compare_latency(fns, repeats=config.repeats, inner=2, baseline="pytorch-fp32")
    pt_bytes = measure.weight_bytes(model)
    for name in fns:
        cos = evaluate.cosine(X.mean_pool(outs[name], feeds["attention_mask"]), ref)
        onnx_file = files.get(name)
        rec.add(name, model=config.encoder, **lat[name], dtype=X.variant_dtype(name),
                weight_bytes=onnx_file.stat().st_size if onnx_file else pt_bytes,
                cosine_to_reference=cos,
                graph_nodes=sum(X.op_counts(onnx_file).values()) if onnx_file else None,
                batch=config.batch, seq_len=config.seq_len)
    if dev.type == "cuda":
        _cuda_variants(rec, model, path, feeds, ref, config, d, dev)
    profiles = {k: X.profile_ops(files[k], feeds, runs=config.profile_runs) for k in ("ort-fp32", "ort-int8-dynamic")}
    return {"export_s": round(export_s, 1), "transformer_fusions": fusions,
            "ort_level_nodes": {lvl: sum(X.optimized_counts(path, lvl).values()) for lvl in X.LEVELS},
            "op_counts_exported": dict(X.op_counts(path).most_common()),
            "op_counts_fused": dict(X.op_counts(fused).most_common()),
            "op_ms_per_call": profiles,
            "latency": f"batch {config.batch} x {config.seq_len} tokens, 2 calls per timed sample, "
                       f"{config.repeats} rotated rounds, {torch.get_num_threads()} threads for PyTorch and ORT"}


def _cuda_variants(rec: Record, model, path: Path, feeds: dict, ref: torch.Tensor, config: Config, d: Path,
                   dev: torch.device) -> None:
    """On a CUDA machine with onnxruntime-gpu: ORT CUDA fp16 (IO binding) vs PyTorch fp32 on the same GPU."""
    if "CUDAExecutionProvider" not in X.available_providers():
        return
    from labkit.export.tensorrt import to_fp16_onnx

    gpu_model = model.to(dev)
    cuda_feeds = {k: v.to(dev) for k, v in feeds.items()}
    sess = X.session(to_fp16_onnx(path, d / "minilm-fp16.onnx"), providers=("cuda",))
    with torch.no_grad():
        fns = {"pytorch-fp32-cuda": lambda: gpu_model(**cuda_feeds).last_hidden_state,
               "ort-cuda-fp16": lambda: X.run_bound(sess, cuda_feeds)[0]}
        outs = {k: fn().float().cpu() for k, fn in fns.items()}
        lat = measure.compare_latency(fns, repeats=config.repeats, inner=10, device=dev, baseline="pytorch-fp32-cuda")
    model.to("cpu")
    for name in fns:
        rec.add(name, model=config.encoder, **lat[name], dtype=X.variant_dtype(name), device=str(dev),
                provider=sess.get_providers()[0],
                baseline="pytorch-fp32-cuda", cosine_to_reference=evaluate.cosine(
                    X.mean_pool(outs[name], feeds["attention_mask"]), ref), batch=config.batch, seq_len=config.seq_len)


def _cnn(rec: Record, config: Config, d: Path) -> dict:
    model = zoo.load_vision(config.cnn, device="cpu", progress=False)  # compared with ORT's CPU provider
    splits = data.digits_splits()
    (xtr, _), (xte, yte) = splits["train"], splits["test"]
    path = X.export_cnn(model, d / "cnn.onnx", exporter=config.exporter)
    calib = X.calibration_feeds(xtr, config.calibration_batches)
    files = {"ort-fp32": path, "ort-int8-static": X.quantize_static_int8(path, d / "cnn-int8.onnx", calib)}
    sessions = {k: X.session(p) for k, p in files.items()}
    batch = data.repeat_to(xte, config.cnn_batch)
    with torch.no_grad():
        fns = {"pytorch-fp32": lambda: model(batch)}
        fns.update({k: (lambda s=s: s.run(None, {"images": batch.numpy()})) for k, s in sessions.items()})
        lat = measure.compare_latency(fns, repeats=config.repeats, inner=10, baseline="pytorch-fp32")
        preds = {"pytorch-fp32": model(xte)}
    preds.update({k: torch.from_numpy(X.run(s, {"images": xte})[0]) for k, s in sessions.items()})
    for name in fns:
        f = files.get(name)
        rec.add(name, model=config.cnn, **lat[name], dtype=X.variant_dtype(name),
                weight_bytes=f.stat().st_size if f else measure.weight_bytes(model),
                accuracy=evaluate.accuracy(preds[name], yte),
                graph_nodes=sum(X.op_counts(f).values()) if f else None, batch=config.cnn_batch)
    return {"cnn_calibration": f"{config.calibration_batches} x 64 training images",
            "cnn_op_counts_int8": dict(X.op_counts(files["ort-int8-static"]).most_common())}


def _best_int8(rec: Record) -> dict:
    """The fastest INT8 encoder graph that keeps cosine >= 0.99 to PyTorch fp32."""
    int8 = [v for v in rec.variants if v.get("model") == rec.config["encoder"] and "int8" in v["name"]
            and v["cosine_to_reference"] >= 0.99]
    if not int8:
        raise LabkitError("no INT8 encoder variant keeps cosine >= 0.99")
    return max(int8, key=lambda v: v["speedup_vs_baseline"])


def encoder_row(rec: Record, name: str) -> dict:
    """The variant ``name`` of the record's encoder (MiniLM): what the ONNX and TensorRT targets read."""
    return rec.variant(name, rec.config["encoder"])


def _best_reduced(rec: Record) -> dict:
    """The faster of the best INT8 ORT variant and PyTorch bf16 (which one wins depends on the CPU: on an AMX Xeon
    bf16 does and INT8 barely pays; on the EPYC of the older records INT8 did)."""
    rows = [_best_int8(rec)] + [v for v in rec.variants if v.get("model") == rec.config["encoder"]
                                and v["name"] == "pytorch-bf16" and v["cosine_to_reference"] >= 0.99]
    return max(rows, key=lambda v: v["speedup_vs_baseline"])


def format_sentence(rec: Record) -> str:
    """Which reduced format pays on the record's machine, computed from it: INT8 in ONNX Runtime (dynamic and
    static, the best) against bf16 in PyTorch, both against PyTorch fp32."""
    int8, best = _best_int8(rec), _best_reduced(rec)
    bf16 = next((v for v in rec.variants if v.get("model") == rec.config["encoder"] and v["name"] == "pytorch-bf16"),
                None)
    flags = ", ".join(f for f in rec.env.get("cpu_flags", []) if "bf16" in f or "amx" in f or "vnni" in f) or "none"
    said = (f"on this machine ({rec.env.get('cpu', '?')}; bf16/int8 features: {flags}) the best INT8 ONNX Runtime "
            f"variant, {int8['name']}, runs {int8['speedup_vs_baseline']:.2f}x PyTorch fp32")
    if bf16 is not None:
        said += f" and PyTorch bf16 {bf16['speedup_vs_baseline']:.2f}x"
    if best is int8:
        return said + ": INT8 pays most here"
    if int8["speedup_vs_baseline"] < 1.1:
        return said + ": INT8 does not pay here and bf16 does, so bf16 is this machine's reduced format"
    return said + ": both pay, bf16 more"


TARGETS = [
    Target("best reduced format (INT8 ORT or PyTorch bf16) speedup_vs_baseline",
           lambda r: _best_reduced(r)["speedup_vs_baseline"], 1.5, "min"),
    Target("best INT8 ORT variant cosine_to_reference", lambda r: _best_int8(r)["cosine_to_reference"], 0.99, "min"),
    Target("ort-fp32 cosine_to_reference", lambda r: encoder_row(r, "ort-fp32")["cosine_to_reference"], 0.9999, "min"),
    Target(
        "ort-fp32-fused graph_nodes - ort-fp32 graph_nodes",
        lambda r: encoder_row(r, "ort-fp32-fused")["graph_nodes"] - encoder_row(r, "ort-fp32")["graph_nodes"],
        -1,
        "max",
    ),
]


def figures(rec: Record) -> list:
    from labkit.viz.plots import latency_bars

    return latency_bars(rec)
