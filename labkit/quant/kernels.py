"""Fused low-bit matmuls: torch's own CPU kernels, which read the packed weight and never build an fp32 copy.

The readable path (:meth:`QuantLinear.dequantize` then ``F.linear``) expands every weight to fp32 on every call,
so it reads the small codes *and* writes and reads a full-size weight: slower than fp32, not faster. A fused
kernel unpacks a tile into registers, multiplies, and moves on; at batch 1, where decode only streams the
weights, reading 1 (int8) or 0.5 (int4) bytes per weight instead of 4 is the whole point.

- int8: ``torch._weight_int8pack_mm(x, int8 [N, K], scale [N])`` takes the weight exactly as
  :class:`~labkit.quant.layers.Int8Linear` stores it.
- int4: ``torch._weight_int4pack_mm_for_cpu(x, packed, group, scale_and_zero [K/group, N, 2])`` computes
  ``w = (q - 8) * scale + zero`` from a blocked layout that ``torch._convert_weight_to_int4pack_for_cpu`` builds,
  so :class:`~labkit.quant.layers.Int4Linear` stores that layout instead of its own when the kernel is used.

Both kernels are vectorized for **bf16 activations**; on fp32 inputs torch runs a reference loop slower than an fp32
matmul (2-core Xeon, 576 x 1536, batch 1: fp32 ``F.linear`` 293 us; int8 kernel on fp32 input 1355 us, on bf16 input
91 us). So the fused path casts activations to ``compute_dtype`` (bf16 by default) for the matmul and the output back:
the numerics of a bf16 model with int8/int4 weights; ``compute_dtype=None`` keeps the input's dtype.

On a GPU the fused kernels are bitsandbytes' (``labkit.quant.bnb``) and torchao's; these layers fall back to the
readable path there and say so once. Private ``torch._`` ops change between releases: each is looked up, and a
missing one is a fallback with its reason, never a crash.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from labkit import LabkitError

KERNELS = ("fused", "dequantize")
INT4_GROUPS = (32, 64, 128, 256)  # the group sizes the CPU int4 kernel accepts
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_said: set[str] = set()


def check_compute_dtype(compute_dtype: torch.dtype | None) -> torch.dtype | None:
    if compute_dtype is not None and compute_dtype not in DTYPES:
        raise LabkitError(f"compute_dtype={compute_dtype} is not allowed; use torch.bfloat16, torch.float16, "
                          "torch.float32 or None (the input's dtype)")
    return compute_dtype


def check_kernel(kernel: str) -> str:
    """``kernel``: "fused" (the fused kernel where one fits this layer and input, else the readable path, said
    once as a warning) or "dequantize" (always the readable path: the lesson's code)."""
    if kernel not in KERNELS:
        raise LabkitError(f"kernel={kernel!r} is not allowed; use one of {', '.join(map(repr, KERNELS))}")
    return kernel


def say_once(what: str, reason: str) -> None:
    """Warn once per process that ``what`` takes the readable path, and why."""
    message = f"{what}: using dequantize-then-matmul ({reason})"
    if message not in _said:
        _said.add(message)
        warnings.warn(message, stacklevel=3)


@functools.cache  # looked up once: int8_reason runs on every forward
def _op(name: str):
    return getattr(torch.ops.aten, name, None)


def int8_reason(x: torch.Tensor) -> str | None:
    """Why the fused int8 kernel cannot take input ``x`` (None: it can)."""
    if x.shape[-1] % 16:  # torch 2.13's bf16 kernel segfaults otherwise (found by tests/quant/test_kernels.py)
        return f"the int8 kernel needs in_features divisible by 16, not {x.shape[-1]}"
    if x.device.type != "cpu":
        return f"no fused int8 kernel is wired for {x.device.type}; labkit.quant.bnb's Linear8bitLt is the GPU path"
    if x.dtype not in DTYPES:
        return f"the int8 kernel takes fp32/bf16/fp16 inputs, not {x.dtype}"
    if _op("_weight_int8pack_mm") is None:
        return f"torch {torch.__version__} has no _weight_int8pack_mm"
    return None


def int8_mm(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
            compute_dtype: torch.dtype | None = torch.bfloat16) -> torch.Tensor:
    """``x @ (qweight * scale).T`` without building the fp32 weight; ``scale`` has one entry per output row. The
    matmul runs on ``x`` cast to ``compute_dtype`` (None: as it is); the result comes back in ``x``'s dtype."""
    dt = compute_dtype or x.dtype
    flat = x.reshape(-1, x.shape[-1]).to(dt).contiguous()
    out = torch._weight_int8pack_mm(flat, qweight, scale.reshape(-1).to(dt))
    return out.reshape(*x.shape[:-1], qweight.shape[0]).to(x.dtype)


def int4_reason(out_features: int, padded_in: int, group_size: int | None, device: torch.device) -> str | None:
    """Why the fused int4 kernel cannot hold a weight of this shape (None: it can)."""
    if device.type != "cpu":
        return f"no fused int4 kernel is wired for {device.type}; labkit.quant.bnb's Linear4bit is the GPU path"
    if group_size not in INT4_GROUPS:
        return f"the CPU int4 kernel takes group_size in {INT4_GROUPS}, not {group_size}"
    if out_features % 16:
        return f"the CPU int4 kernel needs out_features divisible by 16, not {out_features}"
    if padded_in % group_size:
        return f"in_features (padded) {padded_in} is not a multiple of group_size {group_size}"
    if _op("_weight_int4pack_mm_for_cpu") is None or _op("_convert_weight_to_int4pack_for_cpu") is None:
        return f"torch {torch.__version__} has no _weight_int4pack_mm_for_cpu"
    return None


def int4_pack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
              group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's layout from labkit's codes: ``codes`` uint8 0..15 ``[N, K]``, ``scale``/``zero`` one per group
    (row-major, ``[N * K / group]``; ``zero=None`` means the symmetric codes ``q + 8``).

    labkit dequantizes ``(q - z) * s``; the kernel computes ``(q - 8) * s + zero``, so ``zero = (8 - z) * s``.
    Returns the packed weight (uint8 ``[N, K / 2]``) and ``scale_and_zero`` (fp16 ``[K / group, N, 2]``: the
    fp16 scales exactly as the readable layout stores them, and ``zero`` rounded to fp16, within 0.5 % of a step).
    """
    rows, cols = codes.shape
    s = scale.to(torch.float16).float().reshape(rows, cols // group_size)  # the fp16 scales the readable layout keeps
    z = torch.zeros_like(s) if zero is None else (8 - zero.float().reshape_as(s)) * s
    packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 2)
    return packed, torch.stack([s, z], dim=-1).transpose(0, 1).to(torch.float16).contiguous()


def int4_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, scale_and_zero: torch.Tensor,
            padded_in: int, compute_dtype: torch.dtype | None = torch.bfloat16) -> torch.Tensor:
    """``x @ W.T`` from the packed layout (``x`` zero-padded to ``padded_in`` columns where the groups pad), in
    ``compute_dtype`` as :func:`int8_mm`."""
    dt = compute_dtype or x.dtype
    flat = x.reshape(-1, x.shape[-1]).to(dt)
    if flat.shape[1] < padded_in:
        flat = F.pad(flat, (0, padded_in - flat.shape[1]))
    out = torch._weight_int4pack_mm_for_cpu(flat.contiguous(), packed, group_size, scale_and_zero.to(dt))
    return out.reshape(*x.shape[:-1], out.shape[-1]).to(x.dtype)


def int4_dense(packed: torch.Tensor, group_size: int, scale_and_zero: torch.Tensor, padded_in: int) -> torch.Tensor:
    """The fp32 weight ``[N, padded_in]`` of the packed layout, read back through the kernel itself: each row of
    an identity input picks one column, so ``I @ W.T`` is ``W.T`` exactly (one nonzero term per output)."""
    eye = torch.eye(padded_in, dtype=torch.float32)
    return int4_mm(eye, packed.cpu(), group_size, scale_and_zero.cpu(), padded_in, torch.float32).T.contiguous()
