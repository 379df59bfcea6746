"""TensorRT: compile an ONNX graph into an engine tuned for *this* GPU (layer fusion, kernel auto-tuning, reduced
precision), serialise it, reload it, and run it on torch CUDA tensors.

TensorRT needs an NVIDIA GPU and the ``tensorrt`` package (on Colab: ``pip install tensorrt-cu12``). Without them,
every function here raises an error saying which is missing; :func:`support` says so without raising.
TensorRT 10 takes precision as builder flags (``BuilderFlag.FP16``); TensorRT 11 removed them and builds *strongly
typed* networks, where precision comes from the ONNX graph's own types — so for FP16 we convert the ONNX to FP16
first (keeping fp32 inputs/outputs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from labkit import LabkitError

INSTALL_HINT = "pip install tensorrt-cu12 (Colab: a GPU runtime, then this command)"


def support() -> tuple[bool, str]:
    """Whether TensorRT can run here, and if not, what is missing and how to get it."""
    if not torch.cuda.is_available():
        return False, "no CUDA GPU: TensorRT builds engines for NVIDIA GPUs only (on Colab: Runtime → GPU)"
    try:
        import tensorrt as trt
    except ImportError:
        return False, f"the tensorrt package is not installed ({INSTALL_HINT})"
    return True, f"TensorRT {trt.__version__} on {torch.cuda.get_device_name()}"


def _trt():
    ok, why = support()
    if not ok:
        raise LabkitError(f"TensorRT is not available here: {why}")
    import tensorrt as trt

    return trt


def strongly_typed_only(trt: Any) -> bool:
    """TensorRT 11+ has no FP16/INT8 builder flags: networks are strongly typed."""
    return not hasattr(trt.BuilderFlag, "FP16")


def to_fp16_onnx(path: str | Path, out: str | Path) -> Path:
    """The ONNX graph with fp16 weights and compute, fp32 inputs/outputs kept (for strongly typed builds)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
    onnx.save(model, str(out))
    return Path(out)


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, shapes: dict[str, tuple[tuple, tuple, tuple]],
                 fp16: bool = True, workspace_gb: float = 2.0, tf32: bool = False) -> Path:
    """Parse ``onnx_path``, build an engine with one optimisation profile (``shapes``: per input ``(min, opt,
    max)``) and write it serialised to ``engine_path`` (temporary file, then rename).

    TensorRT enables ``BuilderFlag.TF32`` by default, so an "fp32" engine on an Ampere-or-newer GPU multiplies with
    10-bit mantissas; it is cleared unless ``tf32=True``, so fp32 means fp32."""
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    typed = strongly_typed_only(trt)
    src = Path(onnx_path)
    if fp16 and typed:
        src = to_fp16_onnx(onnx_path, Path(engine_path).with_suffix(".fp16.onnx"))
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(src)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise LabkitError(f"TensorRT could not parse {src}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if fp16 and not typed:
        config.set_flag(trt.BuilderFlag.FP16)
    if not tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in shapes:
            raise LabkitError(f"shapes has no (min, opt, max) for input {name!r}; inputs: "
                              f"{[network.get_input(j).name for j in range(network.num_inputs)]}")
        profile.set_shape(name, *shapes[name])
    config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise LabkitError(f"TensorRT failed to build an engine from {src} (see the log above)")
    tmp = Path(str(engine_path) + ".tmp")
    tmp.write_bytes(bytes(blob))
    os.replace(tmp, engine_path)
    return Path(engine_path)


class Engine:
    """A deserialised engine that runs on torch CUDA tensors: ``Engine(path)(input_ids=..., ...)`` → outputs.

    It runs on a stream of its own (TensorRT warns on the legacy default stream, which also serialises with every
    other stream) and never waits on the host: events order it after the caller's stream and the caller's stream
    after it, so a timer's one synchronise is the only one, as for the PyTorch variants."""

    def __init__(self, engine_path: str | Path) -> None:
        trt = _trt()
        self.trt = trt
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise LabkitError(f"{engine_path} is not an engine this TensorRT/GPU can load (engines are tied to both)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self.stream = torch.cuda.Stream()

    def _dtype(self, name: str) -> torch.dtype:
        import numpy as np

        return torch.from_numpy(np.zeros(1, dtype=self.trt.nptype(self.engine.get_tensor_dtype(name)))).dtype

    def __call__(self, **feeds: torch.Tensor) -> list[torch.Tensor]:
        if set(feeds) != set(self.inputs):
            raise LabkitError(f"inputs {sorted(feeds)} do not match the engine's {sorted(self.inputs)}")
        keep = []
        for name in self.inputs:
            t = feeds[name].to(device="cuda", dtype=self._dtype(name)).contiguous()
            keep.append(t)
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise LabkitError(f"input {name!r} has shape {tuple(t.shape)}, outside the engine's optimisation "
                                  f"profile {[tuple(s) for s in self.engine.get_tensor_profile_shape(name, 0)]}")
            _check_address(self.context.set_tensor_address(name, t.data_ptr()), name)
        outs = []
        for name in self.outputs:
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self._dtype(name), device="cuda")
            _check_address(self.context.set_tensor_address(name, out.data_ptr()), name)
            outs.append(out)
        caller = torch.cuda.current_stream()
        self.stream.wait_stream(caller)  # inputs written on the caller's stream are ready before TensorRT reads
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise LabkitError("TensorRT execution failed (see the log above)")
        caller.wait_stream(self.stream)  # the caller's next kernels see finished outputs; no host wait
        for t in keep + outs:
            t.record_stream(self.stream)  # the allocator must not reuse them while TensorRT's stream runs
        return outs


def _check_address(ok: bool, name: str) -> None:
    if not ok:
        raise LabkitError(f"TensorRT refused the address of tensor {name!r} (misaligned or not a device pointer)")

