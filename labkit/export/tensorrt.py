"""TensorRT: compile an ONNX graph into an engine tuned for *this* GPU (layer fusion, kernel auto-tuning, reduced
precision), serialise it, reload it, and run it on torch CUDA tensors.

TensorRT needs an NVIDIA GPU and the ``tensorrt`` package (on Colab: ``pip install tensorrt-cu12``). Without them,
every function here raises an error saying which is missing; :func:`support` says so without raising.
TensorRT 10 takes precision as builder flags (``BuilderFlag.FP16``); TensorRT 11 removed them and builds *strongly
typed* networks, where precision comes from the ONNX graph's own types — so for FP16 we convert the ONNX to FP16
first (keeping fp32 inputs/outputs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from labkit import LabkitError

INSTALL_HINT = "pip install tensorrt-cu12 (Colab: a GPU runtime, then this command)"

# Every TensorRT name this module uses, as (class or "" for the module, attribute, positional arguments passed after
# ``self`` — None for a value, a property or a class). tests/export/test_tensorrt_api.py imports the TensorRT 10 and
# 11 Python bindings on a CPU (against stand-in libraries) and checks that each exists and takes those arguments, so
# this file never ships a call that a release removed.
TRT_API: tuple[tuple[str, str, int | None], ...] = (
    ("", "__version__", None), ("", "nptype", None), ("", "Logger", None), ("Logger", "WARNING", None),
    ("", "Builder", None), ("Builder", "create_network", 1), ("Builder", "create_builder_config", 0),
    ("Builder", "create_optimization_profile", 0), ("Builder", "build_serialized_network", 2),
    ("NetworkDefinitionCreationFlag", "STRONGLY_TYPED", None),
    ("", "OnnxParser", None), ("OnnxParser", "parse_from_file", 1), ("OnnxParser", "num_errors", None),
    ("OnnxParser", "get_error", 1),
    ("IBuilderConfig", "set_memory_pool_limit", 2), ("MemoryPoolType", "WORKSPACE", None),
    ("IBuilderConfig", "set_flag", 1), ("IBuilderConfig", "clear_flag", 1), ("BuilderFlag", "TF32", None),
    ("IBuilderConfig", "add_optimization_profile", 1),
    ("INetworkDefinition", "num_inputs", None), ("INetworkDefinition", "get_input", 1), ("ITensor", "name", None),
    ("IOptimizationProfile", "set_shape", 4),
    ("", "Runtime", None), ("Runtime", "deserialize_cuda_engine", 1),
    ("ICudaEngine", "create_execution_context", 0), ("ICudaEngine", "num_io_tensors", None),
    ("ICudaEngine", "get_tensor_name", 1), ("ICudaEngine", "get_tensor_mode", 1),
    ("ICudaEngine", "get_tensor_dtype", 1), ("ICudaEngine", "get_tensor_profile_shape", 2),
    ("TensorIOMode", "INPUT", None),
    ("IExecutionContext", "set_input_shape", 2), ("IExecutionContext", "set_tensor_address", 2),
    ("IExecutionContext", "get_tensor_shape", 1), ("IExecutionContext", "execute_async_v3", 1),
)
# Used only where the release has them: TensorRT 11 removed the precision builder flags (strongly typed only).
TRT_API_UNTIL_11: tuple[tuple[str, str, int | None], ...] = (("BuilderFlag", "FP16", None),)


def api_problems(trt: Any, entries=TRT_API) -> list[str]:
    """What of ``entries`` the imported TensorRT module ``trt`` lacks, or takes with other arguments (read from the
    pybind11 signatures in each method's docstring); empty when every use is valid."""
    problems = []
    for owner, name, nargs in entries:
        where = getattr(trt, owner, None) if owner else trt
        label = f"{owner}.{name}" if owner else name
        if where is None:
            problems.append(f"{label}: TensorRT {getattr(trt, '__version__', '?')} has no {owner}")
        elif not hasattr(where, name):
            problems.append(f"{label}: TensorRT {getattr(trt, '__version__', '?')} has no {name}")
        elif nargs is not None:
            arities = _arities(getattr(where, name), name)
            if arities and not any(lo <= nargs <= hi for lo, hi in arities):
                problems.append(f"{label}: called with {nargs} argument(s); TensorRT {trt.__version__} takes "
                                f"{' or '.join(f'{lo}..{hi}' if lo != hi else str(lo) for lo, hi in arities)}")
    return problems


def _arities(fn: Any, name: str) -> list[tuple[int, int]]:
    """(required, total) positional parameters after ``self`` for each overload in a pybind11 docstring."""
    import re

    out = []
    for m in re.finditer(rf"^(?:\d+\. )?{re.escape(name)}\((.*)\) ->", fn.__doc__ or "", re.MULTILINE):
        params, depth, cur = [], 0, ""
        for ch in m.group(1):
            depth += 1 if ch in "[(" else -1 if ch in "])" else 0
            if ch == "," and depth == 0:
                params.append(cur.strip())
                cur = ""
            else:
                cur += ch
        params += [cur.strip()] if cur.strip() else []
        params = [p for p in params if not p.startswith("self") and not p.startswith("*")]
        out.append((sum("=" not in p for p in params), len(params)))
    return out


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
    from labkit.atomic import atomic

    with atomic(engine_path) as tmp:
        tmp.write_bytes(bytes(blob))
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

