"""Notebook 01a: zero-point quantization and its inverse, checked against ``labkit.quant.primitives``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from labkit.exercises._check import Mismatch, close, each, gen
from labkit.quant import primitives as prim

NOTEBOOK = "01a"


def _quant_inputs() -> list[tuple[str, torch.Tensor, int]]:
    g = gen(0)
    skewed = torch.rand(4, 64, generator=g) * 3 + 0.5  # all positive: half of a symmetric grid would be wasted
    return [("random rows, 4 bits", torch.randn(8, 64, generator=g), 4),
            ("random rows, 8 bits", torch.randn(8, 128, generator=g), 8),
            ("all-positive rows, 4 bits", skewed, 4),
            ("a constant row", torch.full((1, 32), 0.7), 4),
            ("a single value per row", torch.randn(5, 1, generator=g), 2)]


def _per_row(t: Any, x: torch.Tensor, what: str) -> torch.Tensor:
    """A scale or zero point as a ``[rows, 1]`` column: ``[rows]`` and Python numbers are fine too."""
    t = torch.as_tensor(t, dtype=torch.float32)
    if t.numel() == x.shape[0] and t.dim() <= 2:
        return t.reshape(-1, 1)
    if t.numel() == 1:
        return t.reshape(1, 1).expand(x.shape[0], 1)
    raise Mismatch(f"one {what} per row: {x.shape[0]} expected, yours has shape {tuple(t.shape)}")


def _check_quantize_asymmetric(fn: Callable) -> str:
    # Judged by what quantization must do, not by the kit's exact choices: uint8 codes in range, and every value
    # rebuilt within half a step of the kit's grid. A tighter grid (the textbook min/max range, which need not
    # include 0) passes; a coarser one or a symmetric grid on all-positive rows does not.
    for label, x, bits in each(_quant_inputs()):
        out = fn(x, bits)
        if not (isinstance(out, tuple) and len(out) == 3):
            raise Mismatch("return three things: (codes, scale, zero)")
        q, scale, zero = out
        if not isinstance(q, torch.Tensor) or q.dtype != torch.uint8:
            kind = q.dtype if isinstance(q, torch.Tensor) else type(q).__name__
            raise Mismatch(f"{label}: store the codes as torch.uint8, not {kind} — a float32 code takes 4 bytes and "
                           "an int64 code 8, so the memory quantization was meant to save is gone")
        if tuple(q.shape) != tuple(x.shape):
            raise Mismatch(f"{label}: one code per value: shape {tuple(x.shape)} expected, yours {tuple(q.shape)}")
        if int(q.max()) > 2**bits - 1:
            raise Mismatch(f"{label}: {bits}-bit codes lie in 0..{2**bits - 1}; yours reach {int(q.max())}")
        scale, zero = _per_row(scale, x, "scale"), _per_row(zero, x, "zero point")
        _, ks, _ = prim.quantize_asymmetric(x, bits)
        back = prim.dequantize_asymmetric(q, scale, zero)
        err = (back - x).abs()
        allowed = 0.5 * ks * (1 + 1e-4) + 1e-6
        bad = ~(err <= allowed)  # NaN counts as bad
        if bad.any():
            r, c = (int(v) for v in bad.nonzero()[0])
            raise Mismatch(f"{label}: value {x[r, c].item():.5g} comes back as {back[r, c].item():.5g}, "
                           f"{err[r, c].item():.3g} away; a {bits}-bit grid from the row's min to its max keeps "

                           f"every value within {allowed[r].item():.3g} (half a step) — check the scale "
                           "(max − min) / (2^bits − 1) and the zero point round(−min / scale)")
    return "uint8 codes that rebuild every value within half a step (constant and all-positive rows included)"


def _check_dequantize_asymmetric(fn: Callable) -> str:
    for label, x, bits in each(_quant_inputs()):
        q, s, z = prim.quantize_asymmetric(x, bits)
        close(fn(q, s, z), prim.dequantize_asymmetric(q, s, z), f"{label}: x̂ = (q - zero) * scale")
    return "x̂ = (q − zero) · scale on every row"


# name: (the kit's function, its checker)
EXERCISES = {"quantize_asymmetric": (prim.quantize_asymmetric, _check_quantize_asymmetric),
             "dequantize_asymmetric": (prim.dequantize_asymmetric, _check_dequantize_asymmetric)}
