"""TensorRT vs the other graph compilers on MiniLM (batch 8 x 128 tokens).

On a CUDA GPU with the ``tensorrt`` package: PyTorch fp32 and fp16, ``torch.compile``, ORT CUDA (when
onnxruntime-gpu is installed), TensorRT fp32 and fp16 engines (built, serialised, reloaded, then timed). Anywhere
else the record says ``"status": "skipped"`` with the reason, and still measures the compilers this machine has:
PyTorch eager, ``torch.compile`` and ONNX Runtime with and without the transformer optimizer's fusions.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from labkit import LabkitError, env, evaluate, measure, zoo
from labkit import export as X
from labkit.experiments.protocol import Target, check
from labkit.export import tensorrt as T
from labkit.export.experiment_onnx import encoder_inputs, encoder_row
from labkit.results import Record

NAME = "tensorrt"  # `labkit run tensorrt`
NOTEBOOK = "05_tensorrt"


@dataclass
class Config:
    encoder: str = "minilm-l6"
    batch: int = 8
    seq_len: int = 128
    max_batch: int = 64
    max_seq_len: int = 512
    repeats: int = 7
    exporter: str = "dynamo"
    torch_compile: bool = True
    device: str = env.device_field()

    @classmethod
    def quick(cls) -> Config:
        return cls(repeats=5)

    @classmethod
    def smallest(cls) -> Config:
        """Every code path at the least work (the GPU check's rehearsal and the device tests)."""
        return cls(batch=2, seq_len=16, max_batch=4, max_seq_len=32, repeats=1, torch_compile=False)


def run(config: Config | None = None, progress: bool = True) -> Record:
    config = config or Config()
    dev = env.resolve_device(config.device)
    rec = Record("tensorrt", env=env.describe())
    ok, why = T.support()
    if ok and dev.type != "cuda":
        ok, why = False, f"device={config.device!r}: TensorRT engines run on a CUDA GPU"
    model, tok = zoo.load_encoder(config.encoder, device="cpu")  # exported from the CPU; moved to the GPU there
    feeds = encoder_inputs(tok, config)
    bar = tqdm(total=2, desc="tensorrt: export, then build and time" if ok else "tensorrt (skipped here): export, "
               "then time this machine's compilers", disable=not progress)
    with tempfile.TemporaryDirectory() as d:
        path = X.export_encoder(model, tok, Path(d) / "minilm.onnx", exporter=config.exporter)
        bar.update(1)
        extra = (_gpu(rec, model, path, feeds, config, Path(d), dev) if ok
                 else _cpu(rec, model, path, feeds, config, Path(d)))
        bar.update(1)
    bar.close()
    rec.config = {**asdict(config), "status": "ok" if ok else "skipped", "reason": why, **extra}
    rec.config["targets"] = check(rec, TARGETS)
    return rec


def _add_all(rec: Record, fns: dict, feeds: dict, config: Config, device: str, ref_name: str, extra: dict) -> None:
    with torch.no_grad():
        outs = {k: fn().float().cpu() for k, fn in fns.items()}  # warms up and compiles outside the clock
        lat = measure.compare_latency(fns, repeats=config.repeats, inner=5 if device == "cuda" else 2, device=device,
                                      baseline=ref_name)
    mask = feeds["attention_mask"].cpu()
    ref = X.mean_pool(outs[ref_name], mask)
    for name in fns:
        rec.add(name, model=config.encoder, device=device, **lat[name], dtype=X.variant_dtype(name),
                cosine_to_reference=evaluate.cosine(X.mean_pool(outs[name], mask), ref),
                batch=config.batch, seq_len=config.seq_len, **extra.get(name, {}))


def _cpu(rec, model, path, feeds, config, d) -> dict:
    fused = d / "fused.onnx"
    fusions = X.transformer_fuse(path, fused, num_heads=model.config.num_attention_heads,
                                 hidden_size=model.config.hidden_size)
    sessions = {"ort-fp32": X.session(path), "ort-fp32-fused": X.session(fused)}
    fns = {"pytorch-fp32": lambda: model(**feeds).last_hidden_state}
    if config.torch_compile:
        compiled = torch.compile(model)
        fns["torch-compile"] = lambda: compiled(**feeds).last_hidden_state
    for s in sessions.values():
        X.run(s, feeds)  # checks names, ranks and dtypes once, outside the timed calls
    np_feeds = {k: v.numpy() for k, v in feeds.items()}
    fns.update({k: (lambda s=s: torch.from_numpy(s.run(None, np_feeds)[0])) for k, s in sessions.items()})
    _add_all(rec, fns, feeds, config, "cpu", "pytorch-fp32", {})
    return {"transformer_fusions": fusions, "note": "no TensorRT here: the graph compilers this CPU has, measured"}


def _gpu(rec, model, path, feeds, config, d, dev) -> dict:
    model = model.to(dev)
    cuda = {k: v.to(dev) for k, v in feeds.items()}
    half = zoo.load_encoder(config.encoder, dtype=torch.float16, device=dev)[0]
    shapes = {n: ((1, 2), (config.batch, config.seq_len), (config.max_batch, config.max_seq_len))
              for n in ("input_ids", "attention_mask")}
    engines, extra = {}, {}
    for name, fp16 in (("tensorrt-fp32", False), ("tensorrt-fp16", True)):
        t0 = time.perf_counter()
        built = T.build_engine(path, d / f"{name}.engine", shapes=shapes, fp16=fp16)
        build_s = time.perf_counter() - t0
        engines[name] = T.Engine(built)  # reloaded from the serialised file, as a deployment would
        extra[name] = {"build_s": round(build_s, 1), "weight_bytes": built.stat().st_size}
    fns = {"pytorch-fp32": lambda: model(**cuda).last_hidden_state,
           "pytorch-fp16": lambda: half(**cuda).last_hidden_state}
    if config.torch_compile:
        compiled = torch.compile(model)
        fns["torch-compile"] = lambda: compiled(**cuda).last_hidden_state
    if "CUDAExecutionProvider" in X.available_providers():
        sess = X.session(path, providers=("cuda",))
        fns["ort-cuda-fp32"] = lambda: X.run_bound(sess, cuda)[0]
    fns.update({k: (lambda e=e: e(**cuda)[0]) for k, e in engines.items()})
    _add_all(rec, fns, cuda, config, "cuda", "pytorch-fp32", extra)
    return {"gpu": torch.cuda.get_device_name(dev), "tf32": "off in every fp32 path (TensorRT builder, ORT CUDA, "
            "torch matmul default)", "profile": {k: [list(s) for s in v] for k, v in shapes.items()}}



# On a CPU only the compilers' parity is measured; the TensorRT rows need a CUDA GPU (not measured until one runs it)
TARGETS = [
    Target(
        "torch-compile cosine_to_reference", lambda r: encoder_row(r, "torch-compile")["cosine_to_reference"], 0.9999
    ),
    Target(
        "ort-fp32-fused cosine_to_reference", lambda r: encoder_row(r, "ort-fp32-fused")["cosine_to_reference"], 0.9999
    ),
    Target(
        "tensorrt-fp32 cosine_to_reference", lambda r: encoder_row(r, "tensorrt-fp32")["cosine_to_reference"], 0.9999
    ),
    Target(
        "tensorrt-fp16 cosine_to_reference", lambda r: encoder_row(r, "tensorrt-fp16")["cosine_to_reference"], 0.999
    ),
    Target("tensorrt-fp16 speedup_vs_baseline", lambda r: encoder_row(r, "tensorrt-fp16")["speedup_vs_baseline"], 2.0),
]


def figures(rec: Record) -> list:
    from labkit.viz.plots import latency_bars

    return latency_bars(rec)


_FUSED: dict[tuple[int, int], Any] = {}  # (rows, cols) -> compiled bias+GELU, so moving a slider back is free


def bias_gelu_timing(rows: int, cols: int = 1536, repeats: int = 3, inner: int = 10) -> dict[str, dict[str, Any]]:
    """Eager ``gelu(x + bias)`` (two passes over memory) against inductor's fused loop at ``rows x cols``:
    :func:`labkit.measure.compare_latency` rows, ``"eager"`` and ``"fused"``. Each shape compiles once."""
    import torch.nn.functional as F

    if rows < 1 or cols < 1:
        raise LabkitError(f"rows={rows}, cols={cols}: both must be positive")
    x, b = torch.randn(rows, cols), torch.randn(cols)
    if (rows, cols) not in _FUSED:
        _FUSED[rows, cols] = torch.compile(lambda x, b: F.gelu(x + b), dynamic=False)
    fused = _FUSED[rows, cols]
    fused(x, b)
    return measure.compare_latency({"eager": lambda: F.gelu(x + b), "fused": lambda: fused(x, b)},
                                   repeats=repeats, inner=inner)
