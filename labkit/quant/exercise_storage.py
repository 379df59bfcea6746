"""Notebook 01b: storing 4-bit codes (two a byte) and double quantization of NF4's block constants, checked against
``labkit.quant.primitives``."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from labkit.exercises._check import Mismatch, close, each, gen
from labkit.quant import primitives as prim

NOTEBOOK = "01b"


def _check_pack_int4(fn: Callable) -> str:
    g = gen(1)
    cases = [
        ("random codes", torch.randint(0, 16, (64,), generator=g, dtype=torch.uint8)),
        ("all 15s", torch.full((10,), 15, dtype=torch.uint8)),
        ("two codes", torch.tensor([3, 12], dtype=torch.uint8)),
    ]
    for label, codes in each(cases):
        got = fn(codes)
        want = prim.pack_int4(codes)
        if isinstance(got, torch.Tensor) and got.dtype != torch.uint8:
            raise Mismatch(f"{label}: pack into uint8 bytes, not {got.dtype}")
        if isinstance(got, torch.Tensor) and got.numel() == want.numel() and not torch.equal(got.reshape(-1), want):
            swapped = (want & 0xF) << 4 | (want >> 4)
            if torch.equal(got.reshape(-1), swapped):
                raise Mismatch(f"{label}: the nibbles are swapped — the kit puts the first code in the low 4 bits")
        close(got.reshape(-1) if isinstance(got, torch.Tensor) else got, want, f"{label}: packed bytes", atol=0)
    return "two codes per byte, first code in the low nibble: half the bytes of uint8 codes"


def _check_unpack_int4(fn: Callable) -> str:
    g = gen(2)
    for label, codes in [("random codes", torch.randint(0, 16, (64,), generator=g, dtype=torch.uint8)),
                         ("all 15s", torch.full((8,), 15, dtype=torch.uint8))]:
        got = fn(prim.pack_int4(codes))
        close(got.reshape(-1) if isinstance(got, torch.Tensor) else got, codes, f"{label}: unpacked codes", atol=0)
    return "unpack(pack(codes)) == codes"


def _check_double_quantize(fn: Callable) -> str:
    g = gen(3)
    cases = [("4096 block constants", torch.rand(4096, generator=g) * 0.2 + 0.05),
             ("a partial last block (1000 constants)", torch.rand(1000, generator=g) * 0.3 + 0.01),
             ("identical constants", torch.full((300,), 0.125))]
    for label, absmax in each(cases):
        out = fn(absmax, 256)
        if not (isinstance(out, tuple) and len(out) == 3):
            raise Mismatch("return three things: (int8 codes, per-block scales, the subtracted mean)")
        q, scale, offset = out
        scale, offset = torch.as_tensor(scale, dtype=torch.float32), torch.as_tensor(offset, dtype=torch.float32)
        if not isinstance(q, torch.Tensor) or q.dtype not in (torch.int8, torch.uint8):
            kind = q.dtype if isinstance(q, torch.Tensor) else type(q).__name__
            raise Mismatch(f"{label}: the codes must be stored in 8 bits, yours are {kind}")
        padded = math.ceil(absmax.numel() / 256) * 256
        if q.numel() == padded:  # codes of the zero padding of the last block: stored, but not constants
            q = q.reshape(-1)[: absmax.numel()]
        if q.numel() != absmax.numel():
            raise Mismatch(f"{label}: one code per constant: {absmax.numel()} expected (or {padded} with the last "
                           f"block's padding), {q.numel()} given")
        if scale.numel() != padded // 256:
            raise Mismatch(f"{label}: one scale per block of 256 constants: {padded // 256} expected, "
                           f"{scale.numel()} given")
        offset = offset.reshape(-1)[:1]
        kq, ks, ko = prim.double_quantize(absmax, 256)
        close(prim.double_dequantize(q, scale, offset, 256), prim.double_dequantize(kq, ks, ko, 256),
               f"{label}: the reconstructed constants", atol=1e-6)
    bits = 4 + (8 * q.element_size() * q.numel() + 8 * scale.element_size() * scale.numel()
                + 8 * offset.element_size() * offset.numel()) / (64 * absmax.numel())
    if bits > 4.2:
        raise Mismatch(f"NF4 blocks of 64 with your constants cost {bits:.3f} bits/weight; double quantization "
                       "should bring them to about 4.13")
    return f"constants rebuilt as the kit's; NF4 g64 with them costs {bits:.3f} bits/weight (4.5 without)"



# name: (the kit's function, its checker)
EXERCISES = {"pack_int4": (prim.pack_int4, _check_pack_int4), "unpack_int4": (prim.unpack_int4, _check_unpack_int4),
             "double_quantize": (prim.double_quantize, _check_double_quantize)}
