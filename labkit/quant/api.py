"""``quantize_(model, config)``: swap ``nn.Linear`` layers for packed quantized layers, in place.

Configs say *what* to do; the report says what was done: every quantized layer, and every layer left
alone with the reason (embeddings and ``lm_head`` stay in their dtype by default, as bitsandbytes does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from labkit import LabkitError
from labkit.quant import kernels
from labkit.quant import primitives as prim
from labkit.quant.layers import Int4Linear, Int8Linear, NF4Linear, QuantLinear
from labkit.skip import DEFAULT_SKIP, is_skipped

__all__ = ["DEFAULT_SKIP", "DtypeConfig", "Int4Config", "Int8Config", "NF4Config", "QuantReport", "is_skipped",
           "quantize_", "register_layer"]


@dataclass(frozen=True)
class Int8Config:
    """Symmetric int8 weights, one scale per output channel; ``kernel``: "fused" (torch's int8 matmul where it
    fits, on activations cast to ``compute_dtype``; None: the input's dtype) or "dequantize" (the readable path)."""

    kernel: str = "fused"
    compute_dtype: torch.dtype | None = torch.bfloat16

    def __post_init__(self) -> None:
        kernels.check_kernel(self.kernel)
        kernels.check_compute_dtype(self.compute_dtype)


@dataclass(frozen=True)
class Int4Config:
    """4-bit weights in groups of ``group_size`` along the input dimension (None: per channel); ``kernel`` as
    for :class:`Int8Config` (the CPU int4 kernel takes groups of 32/64/128/256 and out_features % 16 == 0)."""

    group_size: int | None = 128
    symmetric: bool = False
    kernel: str = "fused"
    compute_dtype: torch.dtype | None = torch.bfloat16

    def __post_init__(self) -> None:
        prim.check_group_size(self.group_size)
        kernels.check_kernel(self.kernel)
        kernels.check_compute_dtype(self.compute_dtype)


@dataclass(frozen=True)
class NF4Config:
    """NF4 weights in blocks of ``group_size``; ``double_quant`` also quantizes the block absmax to 8 bits.

    ``layout="row"`` blocks each row (padding its last block); ``"flat"`` blocks the flattened weight across row
    boundaries, exactly as bitsandbytes does, so it matches bitsandbytes on any shape.
    """

    group_size: int = 64
    double_quant: bool = True
    layout: str = "row"

    def __post_init__(self) -> None:
        if self.layout not in ("row", "flat"):
            raise LabkitError(f"layout={self.layout!r} is not allowed; use 'row' (per-row blocks) or 'flat' "
                              "(bitsandbytes' blocks over the flattened weight)")
        if self.group_size is None:
            raise LabkitError("group_size=None is not allowed for NF4; use a positive even block size such as 64")
        prim.check_group_size(self.group_size)


@dataclass(frozen=True)
class DtypeConfig:
    """Cast the whole model to a floating dtype (fp16 / bf16)."""

    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        if self.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise LabkitError(f"dtype={self.dtype} is not allowed; use torch.float16, torch.bfloat16 or torch.float32")


Config = Int8Config | Int4Config | NF4Config | DtypeConfig  # the built-in configs; register_layer adds more


@dataclass
class QuantReport:
    """What :func:`quantize_` did: the layers it replaced by quantized ones (or, for a :class:`DtypeConfig`, cast),
    and the layers it left alone, with the reason."""

    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"quantized {len(self.quantized)} layers; skipped {len(self.skipped)}:"]
        lines += [f"  {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


# config type -> fn(fp32 nn.Linear, config) -> its quantized layer (as torchao's register_quantize_module_handler)
_LAYER_BUILDERS: dict[type, Callable[[nn.Linear, Any], QuantLinear]] = {}


def register_layer(config_type: type) -> Callable:
    """Decorator registering how ``config_type`` turns an ``nn.Linear`` into a quantized layer: a new method is
    its config dataclass and one registered function, with nothing in :func:`quantize_` to edit."""
    def register(fn: Callable[[nn.Linear, Any], QuantLinear]) -> Callable[[nn.Linear, Any], QuantLinear]:
        _LAYER_BUILDERS[config_type] = fn
        return fn
    return register


@register_layer(Int8Config)
def _int8(linear: nn.Linear, config: Int8Config) -> QuantLinear:
    return Int8Linear.from_linear(linear, config.kernel, config.compute_dtype)


@register_layer(Int4Config)
def _int4(linear: nn.Linear, config: Int4Config) -> QuantLinear:
    return Int4Linear.from_linear(linear, config.group_size, config.symmetric, config.kernel, config.compute_dtype)


@register_layer(NF4Config)
def _nf4(linear: nn.Linear, config: NF4Config) -> QuantLinear:
    return NF4Linear.from_linear(linear, config.group_size, config.double_quant, config.layout)


def _bad_config(config: object) -> LabkitError:
    names = ", ".join([t.__name__ for t in _LAYER_BUILDERS] + ["DtypeConfig"])
    return LabkitError(f"config={config!r} is not a quantization config; use one of {names} (or register_layer a "
                       "new one)")


def quantize_(model: nn.Module, config: Config, *, skip: tuple[str, ...] = DEFAULT_SKIP,
              filter_fn: Callable[[nn.Module, str], bool] | None = None) -> QuantReport:
    """Quantize ``model`` in place and return a :class:`QuantReport`.

    ``skip``: patterns of module names kept as they are (:func:`labkit.skip.is_skipped`, the rule pruning
    uses). ``filter_fn(module, name)`` selects modules
    explicitly; selecting a module that is not an ``nn.Linear`` is an error, not a silent no-op.
    """
    report = QuantReport()
    if isinstance(config, DtypeConfig):
        return _cast(model, config.dtype, skip, report)
    build = _LAYER_BUILDERS.get(type(config))
    if build is None:
        raise _bad_config(config)
    for name, module in list(model.named_modules()):
        if not name:
            continue
        selected = filter_fn(module, name) if filter_fn else isinstance(module, nn.Linear)
        if is_skipped(name, skip):
            if isinstance(module, (nn.Linear, nn.Embedding)):
                report.skipped[name] = f"matches skip pattern {skip}"
            continue
        if isinstance(module, nn.Embedding):
            if filter_fn is not None and selected:
                raise LabkitError(f"filter_fn selected {name!r}, an nn.Embedding: only nn.Linear layers are "
                                  "quantizable (an embedding is a lookup table, not a matmul)")
            report.skipped[name] = "embedding: kept in its dtype (a lookup table, not a matmul)"
            continue
        if not selected:
            if isinstance(module, (nn.Conv1d, nn.Conv2d)) or type(module).__name__ == "Conv1D":
                report.skipped[name] = f"{type(module).__name__} is not nn.Linear; not quantized"
            continue
        if not isinstance(module, nn.Linear) or isinstance(module, QuantLinear):
            raise LabkitError(f"cannot quantize {name!r} of type {type(module).__name__}: only nn.Linear "
                              f"layers are quantizable")
        _set_module(model, name, build(_as_fp32(module), config).to(module.weight.device))
        report.quantized.append(name)
    if not report.quantized:
        raise LabkitError("no nn.Linear layer was selected for quantization; check skip / filter_fn")
    return report


def _as_fp32(linear: nn.Linear) -> nn.Linear:
    """An fp32 stand-in for ``linear`` that leaves the caller's layer untouched (``Module.float()`` would convert
    it in place, and a layer held elsewhere, or tied, would change under its owner)."""
    if linear.weight.dtype == torch.float32 and (linear.bias is None or linear.bias.dtype == torch.float32):
        return linear
    out = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    out.weight = nn.Parameter(linear.weight.detach().float(), requires_grad=False)
    if linear.bias is not None:
        out.bias = nn.Parameter(linear.bias.detach().float(), requires_grad=False)
    return out


def _cast(model: nn.Module, dtype: torch.dtype, skip: tuple[str, ...], report: QuantReport) -> QuantReport:
    """Cast every floating parameter and buffer to ``dtype`` except those of modules matching ``skip`` (and
    weights tied to them). A kept ``nn.Linear`` casts its input to its own dtype; a kept embedding hands the
    model ``dtype`` activations, so mixed precision runs (e.g. fp32 ``lm_head`` over a bf16 body)."""
    kept_modules = [m for name, m in model.named_modules() if name and is_skipped(name, skip)]
    kept = {id(p) for m in kept_modules for p in m.parameters()}
    for name, m in model.named_modules():
        for p in m.parameters(recurse=False):
            if id(p) not in kept and p.is_floating_point():
                p.data = p.data.to(dtype)
        for bname, b in list(m.named_buffers(recurse=False)):
            if b.is_floating_point() and not any(m is k for k in kept_modules):
                m._buffers[bname] = b.to(dtype)
        if isinstance(m, nn.Linear):
            if is_skipped(name, skip):
                report.skipped[name] = f"matches skip pattern {skip}; kept in {m.weight.dtype}"
                m.register_forward_pre_hook(lambda mod, args: (args[0].to(mod.weight.dtype), *args[1:]))
            else:
                report.quantized.append(name)
        elif isinstance(m, nn.Embedding) and m.weight.dtype != dtype:
            report.skipped[name] = f"tied to a skipped layer; kept in {m.weight.dtype}"
            m.register_forward_hook(lambda mod, args, out: out.to(dtype))
    return report


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def bits_per_param_quantized(model: nn.Module) -> float:
    """Bits per weight over the quantized layers, constants included (biases excluded).

    Works for labkit layers and for bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` layers.
    """
    from labkit.measure import weight_bytes

    total_bits, total_weights = 0.0, 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total_bits += 8 * m.quantized_bytes()
            total_weights += m.in_features * m.out_features
        elif type(m).__name__ in ("Linear4bit", "Linear8bitLt"):
            bias = 0 if m.bias is None else m.bias.numel() * m.bias.element_size()
            total_bits += 8 * (weight_bytes(m) - bias)
            total_weights += m.in_features * m.out_features
    if not total_weights:
        raise LabkitError("the model has no quantized layers")
    return total_bits / total_weights
