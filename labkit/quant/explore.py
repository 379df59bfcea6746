"""What one quantization setting does to one weight matrix: the dequantized weights, SQNR, bytes (from a real
packed layer where labkit has one) and the grid of levels — the numbers notebook 01's explorer draws."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from labkit.quant import primitives as prim

SCHEMES = ("symmetric", "asymmetric", "minmax", "nf4")  # minmax = llama.cpp's Q4_1 family (float min)
# Bytes of constants per group when no packed layer exists for a format: fp16 scale (+ min) as GGUF stores them.
FORMULA_CONST_BYTES = {"symmetric": 2, "asymmetric": 3, "minmax": 4, "nf4": 4}


def packed_layer(w: torch.Tensor, scheme: str, bits: int, group_size: int | None, double_quant: bool = False):
    """The real packed layer for these settings, when labkit has one (int8 per channel, int4, NF4), else None; in
    the readable layout (the format the lesson draws; the fused int4 layout keeps 1 byte more per group)."""
    from labkit.quant.layers import Int4Linear, Int8Linear, NF4Linear

    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = w.detach().float().cpu()
    if scheme == "nf4" and group_size:
        return NF4Linear.from_linear(lin, group_size, double_quant)
    if scheme in ("symmetric", "asymmetric") and bits == 4:
        return Int4Linear.from_linear(lin, group_size, symmetric=scheme == "symmetric", kernel="dequantize")
    if scheme == "symmetric" and bits == 8 and group_size is None:
        return Int8Linear.from_linear(lin, "dequantize")
    return None


def quant_stats(w: torch.Tensor, scheme: str, bits: int, group_size: int | None,
                double_quant: bool = False) -> dict[str, Any]:
    """Quantize ``w`` (2-D) with the chosen settings; return the dequantized tensor, SQNR and bytes — read from
    a real packed layer's buffers where labkit has one, else computed (and labelled so)."""
    if scheme == "nf4":
        bits = 4
    w = w.detach().float().cpu()
    layer = packed_layer(w, scheme, bits, group_size, double_quant)
    if layer is not None:
        deq, nbytes, source = layer.dequantize(), layer.quantized_bytes(), f"packed {type(layer).__name__}"
    else:
        deq = prim.fake_quantize(w, bits, scheme=scheme, group_size=group_size)
        rows, cols = w.shape
        g = group_size or cols
        n_groups = rows * -(-cols // g)
        nbytes = n_groups * g * bits // 8 + n_groups * FORMULA_CONST_BYTES[scheme]
        source = "formula (no packed layer for this format)"
    return {"dequantized": deq, "sqnr_db": prim.sqnr(w, deq), "bytes": nbytes, "fp32_bytes": w.numel() * 4,
            "bits_per_weight": 8 * nbytes / w.numel(), "bytes_source": source}


def grid_of_widest_group(w: torch.Tensor, scheme: str, bits: int, group_size: int | None) -> torch.Tensor:
    """The values the widest group of ``w`` can take after quantization (``nf4``: the 16 NF4 levels scaled)."""
    groups, _ = prim.to_groups(w.detach().float().cpu(), group_size)
    widest = groups[groups.abs().amax(1).argmax()]
    if scheme == "nf4":
        return prim.NF4_CODE * widest.abs().max()
    if scheme == "symmetric":
        qmax = 2 ** (bits - 1) - 1
        return torch.arange(-qmax, qmax + 1) * widest.abs().max() / qmax
    if scheme == "minmax":
        _, s, lo = prim.quantize_minmax(widest.unsqueeze(0), bits)
        return torch.arange(2**bits) * s[0] + lo[0]
    _, s, z = prim.quantize_asymmetric(widest.unsqueeze(0), bits)
    return (torch.arange(2**bits) - z[0]) * s[0]
