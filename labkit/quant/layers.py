"""Quantized linear layers that *store* packed codes and their constants, and multiply by them.

Each layer keeps only integer codes (two 4-bit codes per byte) and small constants as buffers, so
``labkit.measure.weight_bytes`` sees the real memory. The readable path (``kernel="dequantize"``) rebuilds
the weight with :meth:`dequantize` and calls ``F.linear`` — simple and exact, but it re-expands the weight every
call, so it is *slower* than fp32. With ``kernel="fused"`` (the default) int8 and int4 layers call torch's fused
CPU kernels (:mod:`labkit.quant.kernels`), which read the packed bits inside the matmul, on activations cast to
``compute_dtype`` (bf16 by default: the kernels are vectorized for bf16 only); NF4 has no CPU kernel
in torch and always takes the readable path (bitsandbytes' ``Linear4bit`` is the fused NF4 layer).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from labkit.quant import kernels
from labkit.quant import primitives as prim


class QuantLinear(nn.Module):
    """Base class: shape bookkeeping, bias, and forward: a subclass's fused kernel where it has one that fits,
    else dequantize-then-matmul."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None,
                 kernel: str = "dequantize", compute_dtype: torch.dtype | None = torch.bfloat16) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.kernel = kernels.check_kernel(kernel)
        self.compute_dtype = kernels.check_compute_dtype(compute_dtype)  # the fused kernels' activations
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self._casts: dict[tuple[str, torch.dtype], tuple[torch.Tensor, int, torch.Tensor]] = {}

    def kernel_constant(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Buffer ``name`` in ``dtype``, converted once and kept: the fused kernels want their scales in the
        activations' dtype, and converting on every call is one more copy per matmul (211 a token for SmolLM2).
        Rebuilt when the buffer is replaced (``.to(device)``) or changed in place (``load_state_dict``). The copy
        is a few bytes a row or group (int8: 2 a row; int4: 4 a group) and is not counted in
        :meth:`quantized_bytes`, which is what the layer stores."""
        t = getattr(self, name)
        if t.dtype == dtype:
            return t
        hit = self._casts.get((name, dtype))
        if hit is None or hit[0] is not t or hit[1] != t._version:
            hit = (t, t._version, t.to(dtype))
            self._casts[(name, dtype)] = hit
        return hit[2]

    def dequantize(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def fused(self, x: torch.Tensor) -> torch.Tensor | None:
        """``x @ W.T`` by a fused kernel, or None where none fits (the subclass said why, once)."""
        return None

    def direct(self, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The fused product for inputs of ``dtype`` as one plain function, constants bound once and no checks per
        call (what a tight decode loop calls instead of the module: at batch 1 the module's per-call work is about a
        fifth of a small layer's time); None where the fused kernel would not take such inputs. Same outputs as
        ``self``."""
        return None

    def _bias_added(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.bias is None:
            return fn
        return lambda x, b=self.bias.to(self.compute_dtype): fn(x) + b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        out = self.fused(x) if self.kernel == "fused" else None
        if out is not None:
            return out if bias is None else out + bias
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def quantized_bytes(self) -> int:
        """Bytes of the stored weight codes and constants (bias excluded)."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def bits_per_weight(self) -> float:
        return 8 * self.quantized_bytes() / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits/weight={self.bits_per_weight():.3f}, kernel={self.kernel}"
                + (f", compute_dtype={self.compute_dtype}" if self.kernel == "fused" else ""))


class Int8Linear(QuantLinear):
    """Symmetric per-output-channel int8 weights with one fp32 scale per row."""


    def __init__(self, in_features: int, out_features: int, qweight: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None = None, kernel: str = "fused",
                 compute_dtype: torch.dtype | None = torch.bfloat16) -> None:
        """``qweight``: int8 ``[out, in]``; ``scale``: one fp32 scale per output row. The fused kernel takes
        this layout as it is, so ``kernel`` changes only how ``forward`` computes (in ``compute_dtype``)."""
        super().__init__(in_features, out_features, bias, kernel, compute_dtype)
        self.register_buffer("qweight", qweight.to(torch.int8))
        self.register_buffer("scale", scale.reshape(-1, 1).float())

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel: str = "fused",
                    compute_dtype: torch.dtype | None = torch.bfloat16) -> Int8Linear:
        q, scale = prim.quantize_symmetric(linear.weight.detach(), 8, dim=1)
        return cls(linear.in_features, linear.out_features, q, scale, linear.bias, kernel, compute_dtype)

    @classmethod
    def concat_rows(cls, mods: list[Int8Linear], bias: torch.Tensor | None) -> Int8Linear | None:
        """The layers stacked by output rows (:func:`labkit.stacking.concat_rows`): exact, one scale per row."""
        if len({(m.kernel, m.compute_dtype) for m in mods}) > 1:
            return None
        return cls(mods[0].in_features, sum(m.out_features for m in mods), torch.cat([m.qweight for m in mods]),
                   torch.cat([m.scale for m in mods]), bias, mods[0].kernel, mods[0].compute_dtype)

    def dequantize(self) -> torch.Tensor:
        return prim.dequantize_symmetric(self.qweight, self.scale)

    def direct(self, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor] | None:
        probe = torch.empty(1, self.in_features, dtype=dtype, device=self.qweight.device)
        if self.kernel != "fused" or dtype != self.compute_dtype or kernels.int8_reason(probe):
            return None
        op, q, s, n = torch.ops.aten._weight_int8pack_mm, self.qweight, self.kernel_constant("scale", dtype), \
            self.out_features
        s = s.reshape(-1)
        return self._bias_added(lambda x: op(x.reshape(-1, x.shape[-1]).contiguous(), q, s).reshape(*x.shape[:-1], n))

    def fused(self, x: torch.Tensor) -> torch.Tensor | None:
        reason = kernels.int8_reason(x)
        if reason:
            kernels.say_once("Int8Linear", reason)
            return None
        return kernels.int8_mm(x, self.qweight, self.kernel_constant("scale", self.compute_dtype or x.dtype),
                               self.compute_dtype)


class Int4Linear(QuantLinear):
    """4-bit per-group weights, packed two per byte.

    Readable layout (``kernel="dequantize"``, or where no kernel fits): ``qweight`` low nibble first, fp16
    ``scale`` (+ uint8 ``zero`` when asymmetric) per group. Fused layout: the CPU kernel's blocked ``qweight``
    (the same bytes) and ``scale_and_zero`` (fp16 ``[groups, out, 2]``: 4 bytes a group instead of 3).
    """

    ROW_BLOCK = 64  # torch's CPU int4 layout packs output rows in blocks of this many

    def __init__(self, in_features: int, out_features: int, codes: torch.Tensor, scale: torch.Tensor,
                 zero: torch.Tensor | None, group_size: int | None, bias: torch.Tensor | None = None,
                 kernel: str = "fused", compute_dtype: torch.dtype | None = torch.bfloat16) -> None:
        """``codes``: uint8 0..15, shape ``[out, padded_in]``; ``scale``/``zero``: one per group."""
        super().__init__(in_features, out_features, bias, kernel, compute_dtype)
        self.group_size = group_size
        self.symmetric = zero is None
        self.padded_in = codes.shape[-1] if codes.dim() == 2 else in_features
        self.wanted_kernel = self.kernel  # a move between devices chooses again (see _apply)
        reason = kernels.int4_reason(out_features, self.padded_in, group_size, codes.device)
        if kernel == "fused" and reason:
            kernels.say_once("Int4Linear", reason)
            self.kernel = "dequantize"
        if self.kernel == "fused":
            packed, scale_and_zero = kernels.int4_pack(codes.reshape(out_features, -1), scale, zero, group_size)
            self.register_buffer("qweight", packed)
            self.register_buffer("scale_and_zero", scale_and_zero)
            return
        self.register_buffer("qweight", prim.pack_int4(codes))
        self.register_buffer("scale", scale.reshape(-1).to(torch.float16))
        if zero is not None:
            self.register_buffer("zero", zero.reshape(-1).to(torch.uint8))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int | None = 128, symmetric: bool = False,
                    kernel: str = "fused", compute_dtype: torch.dtype | None = torch.bfloat16) -> Int4Linear:
        w = linear.weight.detach()
        groups, padded = prim.to_groups(w, group_size)
        if symmetric:
            q, scale = prim.quantize_symmetric(groups, 4, scale_dtype=torch.float16)
            codes, zero = (q + 8).to(torch.uint8), None  # store -7..7 as 1..15
        else:  # codes computed with the fp16-rounded scales that are stored (as GPTQ does)
            codes, scale, zero = prim.quantize_asymmetric(groups, 4, scale_dtype=torch.float16)
        return cls(w.shape[1], w.shape[0], codes.reshape(w.shape[0], padded), scale, zero, group_size, linear.bias,
                   kernel, compute_dtype)

    @classmethod
    def from_kernel_layout(cls, in_features: int, out_features: int, packed: torch.Tensor,
                           scale_and_zero: torch.Tensor, group_size: int, padded_in: int,
                           bias: torch.Tensor | None = None, compute_dtype: torch.dtype | None = torch.bfloat16,
                           symmetric: bool = False) -> Int4Linear:
        """A fused-layout layer from the kernel's own tensors (as :func:`labkit.stacking.concat_rows` stacks
        them), without going back through codes."""
        layer = cls.__new__(cls)
        QuantLinear.__init__(layer, in_features, out_features, bias, "fused", compute_dtype)
        layer.group_size, layer.symmetric, layer.padded_in = group_size, symmetric, padded_in
        layer.wanted_kernel = "fused"
        layer.register_buffer("qweight", packed)
        layer.register_buffer("scale_and_zero", scale_and_zero)
        return layer

    @classmethod
    def concat_rows(cls, mods: list[Int4Linear], bias: torch.Tensor | None) -> Int4Linear | None:
        """The layers stacked by output rows (:func:`labkit.stacking.concat_rows`), in the fused layout only: each
        group lies within a row, and torch's packed layout packs rows in blocks of ``ROW_BLOCK``, so stacked packed
        weights equal the packing of stacked codes when every part but the last has a multiple of that many rows
        (SmolLM2's 576/192/192 and 1536/1536 do)."""
        first = mods[0]
        layouts = {(m.kernel, m.compute_dtype, m.group_size, m.padded_in, m.symmetric) for m in mods}
        if len(layouts) > 1 or first.kernel != "fused" or any(m.out_features % cls.ROW_BLOCK for m in mods[:-1]):
            return None
        return cls.from_kernel_layout(first.in_features, sum(m.out_features for m in mods),
                                      torch.cat([m.qweight for m in mods]),
                                      torch.cat([m.scale_and_zero for m in mods], dim=1), first.group_size,
                                      first.padded_in, bias, first.compute_dtype, first.symmetric)

    def _apply(self, fn, recurse: bool = True):
        """Choose the layout again when the layer moves: the fused layout is the CPU kernel's own, so a layer
        leaving the CPU first goes back to the readable layout (the same codes and scales), and a layer arriving
        on a CPU takes the fused layout again where it was asked for and fits."""
        target = fn(torch.empty(0)).device
        if self.kernel == "fused" and target.type != "cpu":
            self._to_readable()
        out = super()._apply(fn, recurse)
        if self.wanted_kernel == "fused" and self.kernel != "fused" and target.type == "cpu" \
                and kernels.int4_reason(self.out_features, self.padded_in, self.group_size, target) is None:
            self._to_fused()
        return out

    def _to_readable(self) -> None:
        """Fused layout -> readable layout, exactly: the kernel stores ``(q - 8) * s + z'`` with ``z' = (8 - z) * s``
        rounded to fp16, so ``q`` and ``z`` come back by rounding."""
        g = self.group_size or self.padded_in
        w = kernels.int4_dense(self.qweight, g, self.scale_and_zero, self.padded_in).reshape(-1, g)
        sz = self.scale_and_zero.float().cpu().transpose(0, 1).reshape(-1, 2)  # one (s, z') per group, row-major
        scale, shift = sz[:, 0], sz[:, 1]
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        codes = torch.round((w - shift[:, None]) / safe[:, None] + 8).clamp(0, 15).to(torch.uint8)
        device = self.qweight.device
        del self._buffers["scale_and_zero"]
        self.register_buffer("qweight", prim.pack_int4(codes.reshape(self.out_features, -1)).to(device))
        self.register_buffer("scale", scale.to(torch.float16).to(device))
        if not self.symmetric:
            self.register_buffer("zero", torch.round(8 - shift / safe).clamp(0, 15).to(torch.uint8).to(device))
        self.kernel, self._casts = "dequantize", {}

    def _to_fused(self) -> None:
        """Readable layout -> the CPU kernel's layout (the codes and scales unchanged)."""
        g = self.group_size or self.padded_in
        codes = prim.unpack_int4(self.qweight).reshape(self.out_features, self.padded_in)
        zero = None if self.symmetric else self._buffers.pop("zero")
        packed, scale_and_zero = kernels.int4_pack(codes, self._buffers.pop("scale"), zero, g)
        self.register_buffer("qweight", packed)
        self.register_buffer("scale_and_zero", scale_and_zero)
        self.kernel, self._casts = "fused", {}

    def direct(self, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if self.kernel != "fused" or dtype != self.compute_dtype or self.qweight.device.type != "cpu":
            return None
        op, w, g, n = torch.ops.aten._weight_int4pack_mm_for_cpu, self.qweight, self.group_size, self.out_features
        sz, pad = self.kernel_constant("scale_and_zero", dtype), (0, self.padded_in - self.in_features)

        def rows(x: torch.Tensor) -> torch.Tensor:  # [tokens, in], zero columns where the groups pad the input
            flat = x.reshape(-1, x.shape[-1])
            return F.pad(flat, pad) if pad[1] else flat.contiguous()
        return self._bias_added(lambda x: op(rows(x), w, g, sz).reshape(*x.shape[:-1], n))

    def fused(self, x: torch.Tensor) -> torch.Tensor | None:
        if x.device.type != "cpu" or x.dtype not in kernels.DTYPES:
            kernels.say_once("Int4Linear", f"the CPU int4 kernel does not take a {x.dtype} input on {x.device.type}")
            return None
        return kernels.int4_mm(x, self.qweight, self.group_size,
                               self.kernel_constant("scale_and_zero", self.compute_dtype or x.dtype), self.padded_in,
                               self.compute_dtype)

    def dequantize(self) -> torch.Tensor:
        if self.kernel == "fused":  # read back through the kernel: its layout is its own
            w = kernels.int4_dense(self.qweight, self.group_size, self.scale_and_zero, self.padded_in)
            return w[:, :self.in_features].to(self.qweight.device)
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
