"""What hardware and libraries are here: the facts every result record carries.

``labkit doctor`` prints :func:`describe` as a table (or JSON with ``--json``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import sys
from dataclasses import field
from functools import lru_cache
from typing import Any

import torch

from labkit import LabkitError

_LIBS = ("torch", "transformers", "gguf", "numpy", "pandas", "bitsandbytes", "onnx", "onnxruntime",
         "torch-pruning", "tensorrt", "triton", "vllm", "ipywidgets")

# One library, several distributions: TensorRT installs as ``tensorrt`` or as its CUDA-specific wheels, ONNX Runtime's
# CUDA build is ``onnxruntime-gpu`` (which still imports as ``onnxruntime``).
_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu13-bindings", "tensorrt-cu12-bindings",
                 "tensorrt-cu11"),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
}


def lib_version(name: str) -> str | None:
    """Installed version of library ``name`` (any of its distributions), or None when it is not installed."""
    dist = lib_distribution(name)
    return importlib.metadata.version(dist) if dist else None


def lib_distribution(name: str) -> str | None:
    """Which distribution provides library ``name`` (e.g. ``onnxruntime-gpu`` for ``onnxruntime``), or None."""
    for dist in _DISTRIBUTIONS.get(name, (name,)):
        try:
            importlib.metadata.version(dist)
            return dist
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def on_colab() -> bool:
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def has_cuda() -> bool:
    return torch.cuda.is_available()


def default_device() -> torch.device:
    """CUDA where there is one, else CPU. ``LABKIT_DEVICE`` overrides."""
    forced = os.environ.get("LABKIT_DEVICE")
    if forced:
        try:
            dev = torch.device(forced)
        except RuntimeError:
            raise LabkitError(f"LABKIT_DEVICE={forced!r} is not a device; use 'cpu', 'cuda' or 'cuda:N'") from None
        if dev.type == "cuda" and not has_cuda():
            raise LabkitError(f"LABKIT_DEVICE={forced!r} but this machine has no CUDA GPU; unset it or use 'cpu'")
        if dev.type not in ("cpu", "cuda", "mps"):
            raise LabkitError(f"LABKIT_DEVICE={forced!r}: labkit runs on 'cpu', 'cuda' or 'cuda:N'")
        return dev
    return torch.device("cuda" if has_cuda() else "cpu")


def resolve_device(device: torch.device | str | None = None) -> torch.device:
    """The device an experiment was asked for, checked: None means :func:`default_device`. A device this machine
    does not have is a clear error naming the value and what is allowed here."""
    if device is None:
        return default_device()
    here = ["cpu"] + (["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())] if has_cuda() else [])
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise LabkitError(f"device={device!r} is not a device; allowed here: {', '.join(here)}") from None
    if dev.type == "cuda":
        if not has_cuda():
            raise LabkitError(f"device={device!r} but this machine has no CUDA GPU; allowed here: {', '.join(here)}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LabkitError(f"device={device!r} but this machine has {torch.cuda.device_count()} CUDA GPU(s); "
                              f"allowed here: {', '.join(here)}")
    elif dev.type != "cpu":
        raise LabkitError(f"device={device!r} is not a device labkit's experiments run on; allowed here: "
                          f"{', '.join(here)}")
    return dev


def device_field() -> Any:
    """The ``device`` field of every experiment ``Config``: a device name, by default :func:`default_device`'s
    (so a GPU run, Colab's included, trains and serves on the GPU); checked by :func:`resolve_device`."""
    return field(default_factory=lambda: str(default_device()))


def quick_mode() -> bool:
    """Whether notebooks shrink their sizes (never their story). Quick is the default on every runtime, CPU or GPU:
    only quick mode has been timed (each notebook's top cell gives the time), and full mode keeps a CPU busy for
    hours. ``LABKIT_QUICK=0`` asks for full mode anywhere."""
    value = os.environ.get("LABKIT_QUICK")
    if value is None:
        return True
    return value.strip() not in ("0", "false", "False", "no")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# CPU features that decide which kernels torch, bitsandbytes and ONNX Runtime pick on x86-64.
_CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


def cpu_flags() -> list[str]:
    """The kernel-relevant CPU features of this machine (empty where /proc/cpuinfo is not available)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [flag for flag in _CPU_FLAGS if flag in have]
    except OSError:
        pass
    return []


def bnb_cpu_path() -> str | None:
    """Which 4-bit CPU path bitsandbytes can take: its optional fused GEMM needs the ``kernels`` package
    (without it bitsandbytes logs "Failed to load CPU gemm_4bit_forward" and falls back); recorded because the
    same bnb-nf4 variant has been seen to differ slightly between hosts of one machine kind."""
    if lib_version("bitsandbytes") is None:
        return None
    return "fused gemm_4bit (kernels installed)" if lib_version("kernels") else "fallback (no `kernels` package)"


def bf16_supported(device: torch.device | str | None = None) -> bool:
    """Whether bf16 runs on ``device`` *natively*. On CUDA that means compute capability 8.0 or newer: a T4 (7.5)
    runs bf16 only by emulation, slowly, and ``torch.cuda.is_bf16_supported()`` says True there unless asked for
    native support alone. A CPU always computes bf16 correctly (natively where it has AVX512-BF16 or AMX)."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return True


def half_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """The 16-bit float to compute in on ``device``: bf16 where it runs natively (any CPU, CUDA compute capability
    8.0+), else fp16 (a T4 runs bf16 only by slow emulation)."""
    return torch.bfloat16 if bf16_supported(device) else torch.float16


def bf16_note(device: torch.device | str | None = None) -> str:
    """One sentence on how bf16 runs on ``device``: native, emulated (slow) or on this CPU's vector units."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        if bf16_supported(device):
            return "bf16 native on this GPU"
        if torch.cuda.is_bf16_supported(including_emulation=True):
            return "bf16 emulated on this GPU (compute capability < 8.0): correct but slow; use fp16 here"
        return "bf16 not supported on this GPU"
    native = set(cpu_flags()) & {"avx512_bf16", "amx_bf16"}
    if native:
        return "bf16 native on this CPU (" + ", ".join(sorted(native)) + ")"

    return "bf16 converted in software on this CPU (no AVX512-BF16/AMX)"


def bf16_native(device: torch.device | str | None = None) -> bool:
    """Whether bf16 matrix products run in hardware on ``device``: CUDA compute capability 8.0+, or an x86 CPU
    with AVX512-BF16 or AMX (oneDNN then multiplies bf16 directly, twice the values a cycle of fp32). Elsewhere
    bf16 is computed by converting to fp32 and back (a T4, an AVX2 CPU): correct, but slower than fp32."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        return bf16_supported(device)
    if device.type == "cpu":
        return bool(set(cpu_flags()) & {"avx512_bf16", "amx_bf16"})
    return False


# dtype="auto" and the names a learner or a command line may use for a float dtype (vLLM's and transformers' words)
DTYPE_NAMES: dict[str, torch.dtype | None] = {
    "auto": None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def auto_dtype(device: torch.device | str | None = None) -> tuple[torch.dtype, str]:
    """What ``dtype="auto"`` computes in on ``device``, and why: bf16 where it is native (:func:`bf16_native`),
    fp32 otherwise. Never fp16 or an emulated bf16 by default: fp16 overflows on some models' activations and
    emulated bf16 is slower than the fp32 it replaces; both stay one explicit argument away."""
    note = bf16_note(device)
    if bf16_native(device):
        return torch.bfloat16, f"{note}: dtype='auto' computes in bfloat16 (half the bytes, native matmuls)"
    return torch.float32, f"{note}: dtype='auto' keeps float32 (bf16 would not be native here)"


def resolve_dtype(dtype: torch.dtype | str, device: torch.device | str | None = None,
                  param: str = "dtype") -> torch.dtype:
    """A float dtype from a ``torch.dtype``, ``"auto"`` (:func:`auto_dtype`) or a name (``"bf16"``,
    ``"float32"``...); anything else is a :class:`~labkit.LabkitError` naming ``param`` and what is allowed."""
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.bfloat16, torch.float16):
            return dtype
    elif isinstance(dtype, str) and dtype in DTYPE_NAMES:
        chosen = DTYPE_NAMES[dtype]
        return chosen if chosen is not None else auto_dtype(device)[0]
    raise LabkitError(f"{param}={dtype!r} is not allowed; use 'auto', torch.float32, torch.bfloat16, torch.float16 "
                      f"or one of the names {', '.join(map(repr, DTYPE_NAMES))}")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: the dtype as records and tables write it."""
    return str(dtype).removeprefix("torch.")


def bnb_backend() -> str | None:
    """Which bitsandbytes backend would serve this machine: 'cuda', 'cpu', or None if unusable."""
    if lib_version("bitsandbytes") is None:
        return None
    if has_cuda():
        return "cuda"
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return None
    return "cpu" if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64") else None


def ort_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except Exception:
        return []
    return list(ort.get_available_providers())


@lru_cache(maxsize=1)
def describe() -> dict[str, Any]:
    """A JSON-serialisable description of this machine, attached to every result record."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "torch_threads": torch.get_num_threads(),
        "device": str(default_device()),
        "gpu": None,
        "colab": on_colab(),
        "fp16_supported": has_cuda(),
        "bf16_supported": bf16_supported(),
        "bf16_note": bf16_note(),
        "bnb_backend": bnb_backend(),
        "bnb_cpu_path": bnb_cpu_path(),
        "ort_providers": ort_providers(),
        "tensorrt": lib_version("tensorrt") is not None,
        "onnxruntime_distribution": lib_distribution("onnxruntime"),
        "triton": lib_version("triton") is not None,
        "vllm": lib_version("vllm") is not None,
        "libraries": {name: lib_version(name) for name in _LIBS},
    }
    auto, why = auto_dtype()
    info.update(auto_dtype=dtype_name(auto), auto_dtype_why=why)
    if has_cuda():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {
            "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "compute_capability": f"{props.major}.{props.minor}",
            "count": torch.cuda.device_count(),
        }
    return info


def format_table(info: dict[str, Any] | None = None) -> str:
    """Human-readable two-column table of :func:`describe`."""
    info = info or describe()
    rows: list[tuple[str, str]] = []
    for key, value in info.items():
        if key == "libraries":
            continue
        if key == "gpu":
            value = "none" if not value else (
                f"{value['name']}, {value['memory_gib']} GiB, cc {value['compute_capability']}")
        if key == "ceilings":
            value = (f"{value['bandwidth_gb_s']:.1f} GB/s read, {value['matmul_gflop_s']:.0f} GFLOP/s "
                     f"{value['matmul_dtype']} GEMM ({value['threads']} threads, {value['device']}; measured now)")
        rows.append((key, str(value)))
    for name, ver in info["libraries"].items():
        rows.append((f"  {name}", ver or "not installed"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
