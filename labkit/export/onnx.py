"""Export to ONNX, run with ONNX Runtime, see what its optimiser fuses, and quantize to INT8.

An ONNX file is a graph of standard operators (MatMul, Add, LayerNormalization, ...) with the weights inside. ONNX
Runtime loads it, rewrites the graph (constant folding, removing redundant nodes, fusing chains of nodes into one
kernel: ``Add + LayerNormalization`` → ``SkipLayerNormalization``, ``Add + Gelu`` → ``BiasGelu``) and runs it on
an *execution provider* (CPU, CUDA, TensorRT). Everything here works on the CPU; CUDA paths need onnxruntime-gpu.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from labkit import LabkitError
from labkit.atomic import atomic

EXPORTERS = ("dynamo", "torchscript")
LEVELS = ("disabled", "basic", "extended", "all")
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


# ------------------------------------------------------------------------------------------------ export

class EncoderForExport(nn.Module):
    """A transformers encoder as ``(input_ids, attention_mask) -> last_hidden_state``: positional tensors in,
    one tensor out, which is what an exporter needs (transformers 5's ``BertModel`` takes keyword arguments)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def export(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], path: str | Path, *,
           input_names: list[str], output_names: list[str], dynamic: dict[str, dict[int, str]] | None = None,
           exporter: str = "dynamo", opset: int = 18) -> Path:
    """Export ``model`` to ``path`` (written to a temporary file, checked with ``onnx.checker``, then renamed).

    ``dynamic`` names the dynamic axes per input, e.g. ``{"input_ids": {0: "batch", 1: "seq"}}``. The dynamo
    exporter (``torch.export``) is the default; ``exporter="torchscript"`` is the older tracer, a fallback for models
    ``torch.export`` rejects. Under dynamo a dynamic axis cannot be 0 or 1 in the example input.
    """
    if exporter not in EXPORTERS:
        raise LabkitError(f"exporter={exporter!r} is not allowed; use one of {EXPORTERS}")
    if len(input_names) != len(example_inputs):
        raise LabkitError(f"input_names has {len(input_names)} names for {len(example_inputs)} example inputs")
    dynamic = dynamic or {}
    if exporter == "dynamo":
        for name, axes in dynamic.items():
            i = input_names.index(name)
            for ax in axes:
                if example_inputs[i].shape[ax] < 2:
                    raise LabkitError(f"example input {name!r} has size {example_inputs[i].shape[ax]} on dynamic axis "
                                      f"{ax}; the dynamo exporter needs at least 2 there (0 and 1 are specialised)")
    path = Path(path)
    model = model.eval()
    try:
        with atomic(path, suffix=".onnx") as tmp, torch.no_grad():
            if exporter == "dynamo":
                from torch.export import Dim

                dims: dict[str, Any] = {}
                shapes = tuple({ax: dims.setdefault(d, Dim(d, min=2)) for ax, d in dynamic.get(n, {}).items()}
                               for n in input_names)  # positional: forward's argument names need not match
                torch.onnx.export(model, example_inputs, tmp, dynamo=True, input_names=input_names,
                                  output_names=output_names, dynamic_shapes=shapes, external_data=False,
                                  opset_version=opset, verbose=False)
            else:
                axes = {**dynamic, **{o: {0: next(iter(dynamic.values()))[0]} for o in output_names if dynamic}}
                torch.onnx.export(model, example_inputs, tmp, dynamo=False, input_names=input_names,
                                  output_names=output_names, dynamic_axes=axes, opset_version=min(opset, 17))
            check(tmp)
    except LabkitError:
        raise
    except Exception as exc:  # atomic() has removed the half-written file
        other = "torchscript" if exporter == "dynamo" else "dynamo"
        raise LabkitError(f"the {exporter} exporter could not export {type(model).__name__} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); try exporter={other!r}, or wrap the "
                          "model so it takes and returns plain tensors") from exc
    return path


def export_encoder(model: nn.Module, tokenizer: Any, path: str | Path, *, exporter: str = "dynamo") -> Path:
    """Export a sentence encoder with dynamic batch and sequence axes."""
    ex = tokenizer(["an example sentence for tracing", "and a second, somewhat longer one to pad against"],
                   padding=True, return_tensors="pt")
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    return export(EncoderForExport(model), (ex["input_ids"], ex["attention_mask"]), path,
                  input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"], dynamic=dyn,
                  exporter=exporter)


def export_cnn(model: nn.Module, path: str | Path, *, exporter: str = "dynamo") -> Path:
    """Export an image classifier ``[batch, 1, 8, 8] -> [batch, classes]`` with a dynamic batch axis."""
    example = torch.zeros(2, 1, 8, 8, device=next(model.parameters()).device)
    return export(model, (example,), path, input_names=["images"], output_names=["logits"],
                  dynamic={"images": {0: "batch"}}, exporter=exporter)


def check(path: str | Path) -> None:
    """``onnx.checker`` with full type/shape checking; a clear error naming the file if the graph is invalid."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise LabkitError(f"{path} is not a valid ONNX model: {str(exc).splitlines()[0]}") from exc


def op_counts(model: str | Path | Any) -> Counter:
    """Nodes per operator type of an ONNX model (a path or a loaded ``ModelProto``)."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False) if isinstance(model, (str, Path)) else model
    return Counter(n.op_type for n in proto.graph.node)


# ------------------------------------------------------------------------------------------------ sessions

def available_providers() -> list[str]:
    from labkit.env import ort_providers

    return ort_providers()


def resolve_providers(names: Iterable[str] | None = None) -> list[str]:
    """ORT provider names for ``names`` (``"cpu"``, ``"cuda"``, ``"tensorrt"`` or full names); ``None`` = the best
    this machine has. A provider asked for by name that is missing is an error, never a silent CPU fallback."""
    have = available_providers()
    if names is None:
        return [p for p in (PROVIDERS["cuda"], PROVIDERS["cpu"]) if p in have]
    out = []
    for n in names:
        full = PROVIDERS.get(n, n)
        if full not in have:
            hint = " (pip install onnxruntime-gpu on a CUDA machine)" if full != PROVIDERS["cpu"] else ""
            raise LabkitError(f"execution provider {n!r} is not available here; this onnxruntime has {have}{hint}")
        out.append(full)
    return out


def provider_options(providers: list[str], *, tf32: bool = False) -> list[dict[str, str]]:
    """Per-provider options. ORT's CUDA provider runs fp32 MatMul/Conv in TF32 by default (``use_tf32``, on from
    Ampere on: 10-bit mantissas in the products), so an fp32 session is not an fp32 reference unless it is turned
    off; ``tf32=True`` keeps the faster, less exact default."""
    return [{"use_tf32": "1" if tf32 else "0"} if p == PROVIDERS["cuda"] else {} for p in providers]


def session(path: str | Path, *, level: str = "all", providers: Iterable[str] | None = ("cpu",),
            threads: int | None = None, optimized_path: str | Path | None = None, profile: bool = False,
            tf32: bool = False):
    """An ``InferenceSession`` at graph-optimisation ``level`` (one of :data:`LEVELS`). ``optimized_path`` saves
    the graph ORT actually runs (to count what it fused); ``threads`` defaults to torch's thread count so PyTorch
    and ORT get the same cores; ``tf32`` see :func:`provider_options`.

    ONNX Runtime quietly falls back to the CPU when a GPU provider fails to initialise (a missing CUDA/cuDNN
    library, say): the session is checked and a clear error names the provider that was asked for and the one
    that actually runs."""
    import onnxruntime as ort

    if level not in LEVELS:
        raise LabkitError(f"level={level!r} is not allowed; use one of {LEVELS}")
    if not Path(path).exists():
        raise LabkitError(f"no ONNX file at {path}")
    so = ort.SessionOptions()
    so.graph_optimization_level = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                   "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.enable_profiling = profile
    # ORT's pool threads spin after each call by default; in an interleaved benchmark they would steal the cores
    # from the next variant (measured: PyTorch's CNN 2.2 → 5.5 ms). Sleeping threads keep the comparison fair.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    wanted = resolve_providers(providers)
    sess = ort.InferenceSession(str(path), so, providers=wanted,
                                provider_options=provider_options(wanted, tf32=tf32))
    check_provider(sess, wanted[0])
    return sess


def check_provider(sess, wanted: str) -> str:
    """The provider that really runs ``sess`` first; a clear error when it is not ``wanted``."""
    running = sess.get_providers()
    if not running or running[0] != wanted:
        raise LabkitError(f"ONNX Runtime was asked for {wanted} but runs {running or 'nothing'}: the provider failed "
                          "to start (for CUDA: onnxruntime-gpu needs the CUDA and cuDNN libraries of its build; "
                          "installing onnxruntime beside onnxruntime-gpu also hides the GPU provider)")
    return running[0]


_NP_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
             "tensor(float16)": np.float16}


def run(sess, feeds: dict[str, Any]) -> list[np.ndarray]:
    """``sess.run`` after checking every input's name, rank and dtype, with an error that says what was expected."""
    expected = {i.name: i for i in sess.get_inputs()}
    if set(feeds) != set(expected):
        raise LabkitError(f"inputs {sorted(feeds)} do not match the session's {sorted(expected)}")
    arrays = {}
    for name, value in feeds.items():
        a = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        spec = expected[name]
        if a.ndim != len(spec.shape):
            raise LabkitError(f"input {name!r} has rank {a.ndim} (shape {a.shape}); the model expects rank "
                              f"{len(spec.shape)} {spec.shape}")
        want = _NP_TYPES.get(spec.type)
        if want is not None and a.dtype != want:
            raise LabkitError(f"input {name!r} is {a.dtype}; the model expects {spec.type} ({np.dtype(want).name})")
        arrays[name] = a
    return sess.run(None, arrays)


def run_bound(sess, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Run with IO binding on the inputs' device (CUDA: no host copies per call); outputs stay on the device and
    come back as torch tensors through DLPack (zero copy: ORT 1.32's ``OrtValue`` has ``__dlpack__``, not the old
    ``to_dlpack``)."""
    binding = sess.io_binding()
    dev = next(iter(feeds.values())).device
    types = {i.name: i.type for i in sess.get_inputs()}
    keep = []  # .contiguous() may make a temporary: it must outlive the run that reads its pointer
    for name, t in feeds.items():
        t = t.contiguous()
        keep.append(t)
        binding.bind_input(name, dev.type, dev.index or 0, _NP_TYPES[types[name]], tuple(t.shape), t.data_ptr())
    for o in sess.get_outputs():
        binding.bind_output(o.name, dev.type, dev.index or 0)
    binding.synchronize_inputs()  # torch may still be writing the inputs on its stream
    sess.run_with_iobinding(binding)
    binding.synchronize_outputs()
    return [torch.from_dlpack(v) for v in binding.get_outputs()]



def optimized_counts(path: str | Path, level: str) -> Counter:
    """Operator counts of the graph ORT runs at ``level`` (it saves the optimised graph for us to count)."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "optimized.onnx"
        session(path, level=level, optimized_path=out)
        return op_counts(out)


def transformer_fuse(path: str | Path, out: str | Path, *, num_heads: int, hidden_size: int,
                     model_type: str = "bert") -> dict[str, int]:
    """ONNX Runtime's transformer optimizer (offline fusions: SkipLayerNormalization, BiasGelu, Attention where the
    pattern matches); writes ``out`` atomically and returns the fused-operator counts it reports."""
    from onnxruntime.transformers.optimizer import optimize_model

    opt = optimize_model(str(path), model_type=model_type, num_heads=num_heads, hidden_size=hidden_size,
                         opt_level=0)
    with atomic(out, suffix=".onnx") as tmp:
        opt.save_model_to_file(str(tmp))
    return {k: v for k, v in opt.get_fused_operator_statistics().items() if v}


# ------------------------------------------------------------------------------------------------ INT8

def quantize_dynamic_int8(path: str | Path, out: str | Path, *, per_channel: bool = True,
                          op_types: Iterable[str] | None = ("MatMul",)) -> Path:
    """Dynamic INT8 (weights quantized once, activations per call): ORT's ``quantize_dynamic``.

    Per-channel weights keep MiniLM's embeddings (cosine 0.993 vs 0.93 per-tensor). ``op_types`` chooses which ops
    are quantized (``None``: every op ORT supports). ``DefaultTensorType`` lets it quantize graphs whose value
    types the optimizer dropped."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with atomic(out, suffix=".onnx") as tmp:
        quantize_dynamic(str(path), str(tmp), per_channel=per_channel, weight_type=QuantType.QInt8,
                         op_types_to_quantize=list(op_types) if op_types else None,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return Path(out)


def calibration_feeds(images: torch.Tensor, batches: int, batch_size: int = 64,
                      name: str = "images") -> list[dict[str, np.ndarray]]:
    """``batches`` consecutive feeds of ``batch_size`` images each, as host arrays, for
    :func:`quantize_static_int8`."""
    if batches < 1 or batches * batch_size > len(images):
        raise LabkitError(f"batches={batches}: need 1 to {len(images) // batch_size} batches of {batch_size} from "
                          f"{len(images)} images")
    return [{name: images[i * batch_size:(i + 1) * batch_size].cpu().numpy()} for i in range(batches)]


def quantize_static_int8(path: str | Path, out: str | Path, calibration: Iterable[dict[str, np.ndarray]], *,
                         per_channel: bool = True, op_types: Iterable[str] | None = None) -> Path:
    """Static INT8 in QDQ format: activation ranges from ``calibration`` feeds (``labkit.data``), then
    QuantizeLinear/DequantizeLinear pairs around each quantized op, which ORT fuses into integer kernels.
    ``op_types`` chooses which ops are quantized (``None``: every op ORT supports)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    batches = list(calibration)
    if not batches:
        raise LabkitError("calibration gave no batch: static quantization needs representative inputs")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(batches)

        def get_next(self):
            return next(self.it, None)

    with atomic(out, suffix=".onnx") as tmp:
        quantize_static(str(path), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(op_types) if op_types else None)
    return Path(out)


# ------------------------------------------------------------------------------------------------ parity

def mean_pool(hidden: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (sentence-transformers' recipe for MiniLM)."""
    h, m = torch.as_tensor(hidden).float(), torch.as_tensor(mask).unsqueeze(-1).float()
    return F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)


def parity(reference: torch.Tensor | np.ndarray, output: torch.Tensor | np.ndarray,
           mask: torch.Tensor | np.ndarray | None = None, *, atol: float = 1e-4, rtol: float = 1e-3) -> dict:
    """Does ``output`` compute what ``reference`` computes? Over the real positions only (``mask [B, L]`` of
    1/0 for ``[B, L, ...]`` outputs: padding is excluded), the largest absolute difference and where it is, the
    mean per-row cosine (a row = one batch item), and whether every element is within ``atol + rtol·|reference|``
    (the rule of ``numpy.testing.assert_allclose``)."""
    a, b = torch.as_tensor(reference).float(), torch.as_tensor(output).float()
    if a.shape != b.shape:
        raise LabkitError(f"outputs differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    keep = torch.ones(a.shape[:2] if a.dim() > 1 else a.shape, dtype=torch.bool)
    if mask is not None:
        keep = torch.as_tensor(mask).bool()
        if a.dim() < 2 or tuple(keep.shape) != tuple(a.shape[:2]):
            raise LabkitError(f"mask has shape {tuple(keep.shape)}; it must match the output's first two axes "
                              f"{tuple(a.shape[:2])}")
    keep = keep.reshape(*keep.shape, *([1] * (a.dim() - keep.dim()))).expand_as(a)
    diff = torch.where(keep, (a - b).abs(), torch.zeros(()))
    worst = torch.unravel_index(diff.argmax(), diff.shape)
    zero = torch.zeros(())
    cos = F.cosine_similarity(torch.where(keep, a, zero).flatten(1), torch.where(keep, b, zero).flatten(1), dim=-1) \
        if a.dim() > 1 else F.cosine_similarity(a, b, dim=0)[None]
    return {"max_abs_diff": float(diff.max()), "worst": [int(i) for i in worst], "cosine": float(cos.mean()),
            "within_tolerance": bool(((a - b).abs() <= atol + rtol * a.abs())[keep].all())}


def profile_ops(path: str | Path, feeds: dict[str, Any], *, runs: int = 5, level: str = "all") -> dict[str, float]:
    """Milliseconds per call spent in each operator type, from ORT's own profiler (``runs`` calls after one
    warm-up), largest first: where the time goes, and so what quantizing or fusing can buy."""
    import json

    with tempfile.TemporaryDirectory() as d:
        sess = session(path, level=level, profile=True)
        sess.get_session_options().profile_file_prefix = str(Path(d) / "ort")
        run(sess, feeds)
        for _ in range(runs):
            run(sess, feeds)
        trace = Path(sess.end_profiling())
        events = json.loads(trace.read_text())
        trace.unlink(missing_ok=True)
    per_op: Counter = Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_op[e.get("args", {}).get("op_name", "?")] += e.get("dur", 0) / 1e3 / (runs + 1)
    return {k: round(v, 3) for k, v in per_op.most_common()}


def variant_dtype(name: str) -> str:
    """The number format a variant of the export experiments computes in, read from its name (``pytorch-bf16``,
    ``trt-fp16``, ``ort-int8-dynamic``; everything else fp32), as record rows write it."""
    for tag, dtype in (("int8", "int8"), ("bf16", "bfloat16"), ("fp16", "float16")):
        if tag in name.split("-"):
            return dtype
    return "float32"
