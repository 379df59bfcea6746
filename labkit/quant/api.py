"""``quantize_(model, config)``: swap ``nn.Linear`` layers for packed quantized layers, in place.

Configs say *what* to do; the report says what was done: every quantized layer, and every layer left
alone with the reason (embeddings and ``lm_head`` stay in their dtype by default, as bitsandbytes does).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from labkit import LabkitError
from labkit.quant import primitives as P
from labkit.quant.layers import Int4Linear, Int8Linear, NF4Linear, QuantLinear

DEFAULT_SKIP = ("lm_head",)


@dataclass(frozen=True)
class Int8Config:
    """Symmetric int8 weights, one scale per output channel."""


@dataclass(frozen=True)
class Int4Config:
    """4-bit weights in groups of ``group_size`` along the input dimension (None: per channel)."""

    group_size: int | None = 128
    symmetric: bool = False

    def __post_init__(self) -> None:
        P.check_group_size(self.group_size)


@dataclass(frozen=True)
class NF4Config:
    """NF4 weights in blocks of ``group_size``; ``double_quant`` also quantizes the block absmax to 8 bits."""

    group_size: int = 64
    double_quant: bool = True

    def __post_init__(self) -> None:
        if self.group_size is None:
            raise LabkitError("group_size=None is not allowed for NF4; use a positive even block size such as 64")
        P.check_group_size(self.group_size)


@dataclass(frozen=True)
class DtypeConfig:
    """Cast the whole model to a floating dtype (fp16 / bf16)."""

    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        if self.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise LabkitError(f"dtype={self.dtype} is not allowed; use torch.float16, torch.bfloat16 or torch.float32")


Config = Int8Config | Int4Config | NF4Config | DtypeConfig


@dataclass
class QuantReport:
    """What :func:`quantize_` did: quantized layer names and skipped layers with reasons."""

    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"quantized {len(self.quantized)} layers; skipped {len(self.skipped)}:"]
        lines += [f"  {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _make_layer(linear: nn.Linear, config: Config) -> QuantLinear:
    if isinstance(config, Int8Config):
        return Int8Linear(linear)
    if isinstance(config, Int4Config):
        return Int4Linear.from_linear(linear, config.group_size, config.symmetric)
    if isinstance(config, NF4Config):
        return NF4Linear(linear, config.group_size, config.double_quant)
    raise _bad_config(config)


def _bad_config(config: object) -> LabkitError:
    return LabkitError(f"config={config!r} is not a quantization config; use Int8Config, Int4Config, "
                       f"NF4Config or DtypeConfig")


def quantize_(model: nn.Module, config: Config, *, skip: tuple[str, ...] = DEFAULT_SKIP,
              filter_fn: Callable[[nn.Module, str], bool] | None = None) -> QuantReport:
    """Quantize ``model`` in place and return a :class:`QuantReport`.

    ``skip``: glob patterns of module names kept as they are. ``filter_fn(module, name)`` selects modules
    explicitly; selecting a module that is not an ``nn.Linear`` is an error, not a silent no-op.
    """
    report = QuantReport()
    if isinstance(config, DtypeConfig):
        model.to(config.dtype)
        report.quantized = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        return report
    if not isinstance(config, (Int8Config, Int4Config, NF4Config)):
        raise _bad_config(config)
    for name, module in list(model.named_modules()):
        if not name:
            continue
        selected = filter_fn(module, name) if filter_fn else isinstance(module, nn.Linear)
        if any(fnmatch.fnmatch(name, pat) or name.endswith("." + pat) for pat in skip):
            if isinstance(module, (nn.Linear, nn.Embedding)):
                report.skipped[name] = f"matches skip pattern {skip}"
            continue
        if isinstance(module, nn.Embedding):
            report.skipped[name] = "embedding: kept in its dtype (a lookup table, not a matmul)"
            continue
        if not selected:
            if isinstance(module, (nn.Conv1d, nn.Conv2d)) or type(module).__name__ == "Conv1D":
                report.skipped[name] = f"{type(module).__name__} is not nn.Linear; not quantized"
            continue
        if not isinstance(module, nn.Linear) or isinstance(module, QuantLinear):
            raise LabkitError(f"cannot quantize {name!r} of type {type(module).__name__}: only nn.Linear "
                              f"layers are quantizable")
        _set_module(model, name, _make_layer(module.float(), config).to(module.weight.device))
        report.quantized.append(name)
    if not report.quantized:
        raise LabkitError("no nn.Linear layer was selected for quantization; check skip / filter_fn")
    return report


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


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
