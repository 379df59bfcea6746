"""Quantized linear layers that *store* packed codes and their constants, and dequantize on the fly.

Each layer keeps only integer codes (two 4-bit codes per byte) and small constants as buffers, so
``labkit.measure.weight_bytes`` sees the real memory. ``forward`` rebuilds the weight with
:meth:`dequantize` and calls ``F.linear`` — simple and exact, but it re-expands the weight every call, so it
is usually *slower* than fp32 on a CPU. Fused kernels (bitsandbytes, Marlin, torchao) dequantize inside
the matmul on a GPU instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from labkit.quant import primitives as prim


class QuantLinear(nn.Module):
    """Base class: shape bookkeeping, bias, forward by dequantize-then-matmul."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    def dequantize(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantize().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def quantized_bytes(self) -> int:
        """Bytes of the stored weight codes and constants (bias excluded)."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def bits_per_weight(self) -> float:
        return 8 * self.quantized_bytes() / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits/weight={self.bits_per_weight():.3f}")


class Int8Linear(QuantLinear):
    """Symmetric per-output-channel int8 weights with one fp32 scale per row."""


    def __init__(self, in_features: int, out_features: int, qweight: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None = None) -> None:
        """``qweight``: int8 ``[out, in]``; ``scale``: one fp32 scale per output row."""
        super().__init__(in_features, out_features, bias)
        self.register_buffer("qweight", qweight.to(torch.int8))
        self.register_buffer("scale", scale.reshape(-1, 1).float())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q, scale = prim.quantize_symmetric(linear.weight.detach(), 8, dim=1)
        return cls(linear.in_features, linear.out_features, q, scale, linear.bias)

    def dequantize(self) -> torch.Tensor:
        return prim.dequantize_symmetric(self.qweight, self.scale)


class Int4Linear(QuantLinear):
    """4-bit per-group weights, packed two per byte, fp16 scales (+ uint8 zero points when asymmetric)."""


    def __init__(self, in_features: int, out_features: int, codes: torch.Tensor, scale: torch.Tensor,
                 zero: torch.Tensor | None, group_size: int | None, bias: torch.Tensor | None = None) -> None:
        """``codes``: uint8 0..15, shape ``[out, padded_in]``; ``scale``/``zero``: one per group."""
        super().__init__(in_features, out_features, bias)
        self.group_size = group_size
        self.symmetric = zero is None
        self.register_buffer("qweight", prim.pack_int4(codes))
        self.register_buffer("scale", scale.reshape(-1).to(torch.float16))
        if zero is not None:
            self.register_buffer("zero", zero.reshape(-1).to(torch.uint8))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int | None = 128, symmetric: bool = False) -> Int4Linear:
        w = linear.weight.detach()
        groups, padded = prim.to_groups(w, group_size)
        if symmetric:
            q, scale = prim.quantize_symmetric(groups, 4, scale_dtype=torch.float16)
            codes, zero = (q + 8).to(torch.uint8), None  # store -7..7 as 1..15
        else:  # codes computed with the fp16-rounded scales that are stored (as GPTQ does)
            codes, scale, zero = prim.quantize_asymmetric(groups, 4, scale_dtype=torch.float16)
        return cls(w.shape[1], w.shape[0], codes.reshape(w.shape[0], padded), scale, zero, group_size, linear.bias)

    def dequantize(self) -> torch.Tensor:
        g = self.group_size or self.in_features
        codes = prim.unpack_int4(self.qweight).view(-1, g)
        scale = self.scale.float().view(-1, 1)
        if self.symmetric:
            groups = (codes.float() - 8) * scale
        else:
            groups = prim.dequantize_asymmetric(codes, scale, self.zero.view(-1, 1))
        return prim.from_groups(groups, self.out_features, self.in_features)


class NF4Linear(QuantLinear):
    """NF4 codes (packed) with one absmax per block; with double quantization the absmax are int8 too.

    ``layout="row"`` (default): blocks run along each row, the last one zero-padded — the layout GPTQ-style
    per-row methods and kernels want. ``layout="flat"``: blocks run over the flattened weight, across row
    boundaries, as bitsandbytes stores it; the two agree only when a row's width is a multiple of the block.
    """


    def __init__(self, in_features: int, out_features: int, codes: torch.Tensor, absmax: torch.Tensor,
                 group_size: int = 64, double_quant: bool = True, bias: torch.Tensor | None = None,
                 layout: str = "row") -> None:
        """``codes``: uint8 0..15 NF4 indices (``[out, padded_in]`` by row, or flat); ``absmax``: one per block."""
        super().__init__(in_features, out_features, bias)
        self.group_size, self.double_quant, self.layout = group_size, double_quant, layout
        self.register_buffer("qweight", prim.pack_int4(codes))
        if double_quant:
            q, scale, offset = prim.double_quantize(absmax)
            self.register_buffer("absmax_q", q)
            self.register_buffer("absmax_scale", scale)
            self.register_buffer("absmax_offset", offset)
        else:
            self.register_buffer("absmax", absmax.float())

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 64, double_quant: bool = True,
                    layout: str = "row") -> NF4Linear:
        w = linear.weight.detach()
        if layout == "flat":
            codes, absmax = prim.quantize_nf4(w.reshape(-1), group_size)
        else:
            groups, _ = prim.to_groups(w, group_size)
            codes, absmax = prim.quantize_nf4(groups, group_size)
        return cls(linear.in_features, linear.out_features, codes, absmax, group_size, double_quant, linear.bias,
                   layout)

    def block_absmax(self) -> torch.Tensor:
        if self.double_quant:
            return prim.double_dequantize(self.absmax_q, self.absmax_scale, self.absmax_offset)
        return self.absmax

    def dequantize(self) -> torch.Tensor:
        n = self.out_features * self.in_features
        flat = prim.dequantize_nf4(prim.unpack_int4(self.qweight), self.block_absmax())
        if self.layout == "flat":
            return flat[:n].view(self.out_features, self.in_features)
        return prim.from_groups(flat.view(-1, self.group_size), self.out_features, self.in_features)
