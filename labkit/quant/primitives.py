"""Quantization math as pure functions on tensors — read this file in one sitting.

A b-bit quantizer maps real numbers to 2**b integer codes and back:

* **symmetric (absmax)**: ``scale = max|x| / (2**(b-1) - 1)``, ``q = round(x / scale)`` in
  ``[-(2**(b-1)-1), 2**(b-1)-1]``, ``x ≈ q * scale``. Zero is exact; half of a skewed range is wasted.
* **asymmetric (zero-point)**: ``scale = (max - min) / (2**b - 1)``, ``zero = round(-min / scale)``,
  ``q = clamp(round(x / scale) + zero, 0, 2**b - 1)``, ``x ≈ (q - zero) * scale``. Uses the whole range.
* **NF4** (QLoRA): 16 code values at quantiles of a standard normal, scaled by each block's absmax —
  optimal for normally distributed weights.

Granularity is the group over which one scale is shared: the whole tensor, each output channel (row),
or groups of ``group_size`` consecutive weights within a row (the last group is zero-padded).
"""

from __future__ import annotations

import math

import torch

from labkit import LabkitError

# ------------------------------------------------------------------------------------------- helpers


def check_bits(bits: int, allowed: tuple[int, ...] = (2, 3, 4, 8)) -> None:
    if bits not in allowed:
        raise LabkitError(f"bits={bits!r} is not supported; allowed: {allowed}")


def check_group_size(group_size: int | None, multiple_of: int = 2) -> None:
    """``None`` means one group per row; otherwise a positive multiple of ``multiple_of``."""
    if group_size is None:
        return
    if not isinstance(group_size, int) or group_size <= 0 or group_size % multiple_of:
        raise LabkitError(f"group_size={group_size!r} must be None (per channel) or a positive "
                          f"multiple of {multiple_of}")


def to_groups(w: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, int]:
    """Reshape a 2-D weight ``[rows, cols]`` to ``[rows * n_groups, group_size]``, zero-padding each row.

    Returns the grouped tensor and the padded column count. ``group_size=None``: one group per row.
    """
    if w.dim() != 2:
        raise LabkitError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    g = cols if group_size is None else group_size
    padded = math.ceil(cols / g) * g
    if padded != cols:
        w = torch.nn.functional.pad(w, (0, padded - cols))
    return w.reshape(rows * (padded // g), g), padded


def from_groups(groups: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`to_groups`: drop the padding."""
    return groups.reshape(rows, -1)[:, :cols]


# ------------------------------------------------------------------------------------- integer schemes


def _stored(scale: torch.Tensor, scale_dtype: torch.dtype | None) -> torch.Tensor:
    """The scale as it will be stored (e.g. fp16), back in fp32: codes must be computed with *this* scale."""
    if scale_dtype is None:
        return scale
    tiny = torch.finfo(scale_dtype).tiny
    return scale.clamp(min=tiny, max=torch.finfo(scale_dtype).max).to(scale_dtype).float()


def quantize_symmetric(x: torch.Tensor, bits: int, dim: int = -1, scale_dtype: torch.dtype | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax quantization along ``dim`` (each slice gets a scale). Returns int8 codes and scales.

    ``scale_dtype``: the dtype the scales will be stored in; codes are computed with the rounded scales."""
    check_bits(bits)
    qmax = 2 ** (bits - 1) - 1
    absmax = x.abs().amax(dim=dim, keepdim=True).float()
    scale = _stored((absmax / qmax).clamp(min=torch.finfo(torch.float32).tiny), scale_dtype)
    q = torch.clamp(torch.round(x.float() / scale), -qmax, qmax).to(torch.int8)
    return q, scale


def dequantize_symmetric(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()


def quantize_asymmetric(x: torch.Tensor, bits: int, dim: int = -1, scale_dtype: torch.dtype | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero-point quantization along ``dim``. Returns uint8 codes in ``[0, 2**bits-1]``, scales, zeros.

    ``scale_dtype``: the dtype the scales will be stored in; codes are computed with the rounded scales."""
    check_bits(bits)
    qmax = 2**bits - 1
    lo = x.amin(dim=dim, keepdim=True).float().clamp(max=0)  # keep 0 representable exactly
    hi = x.amax(dim=dim, keepdim=True).float().clamp(min=0)
    scale = _stored(((hi - lo) / qmax).clamp(min=torch.finfo(torch.float32).tiny), scale_dtype)
    zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    q = torch.clamp(torch.round(x.float() / scale) + zero, 0, qmax).to(torch.uint8)
    return q, scale, zero


def dequantize_asymmetric(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q.float() - zero.float()) * scale.float()


def quantize_minmax(x: torch.Tensor, bits: int, dim: int = -1
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """llama.cpp's Q4_1 family: ``2**bits`` levels from each slice's min to its max, a float scale and a float
    minimum (0.0 need not be exact). Returns uint8 codes, scales and minimums."""
    check_bits(bits)
    qmax = 2**bits - 1
    lo = x.amin(dim=dim, keepdim=True).float()
    hi = x.amax(dim=dim, keepdim=True).float()
    scale = ((hi - lo) / qmax).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.clamp(torch.round((x.float() - lo) / scale), 0, qmax).to(torch.uint8)
    return q, scale, lo


def dequantize_minmax(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float() + lo.float()


def fake_quantize(w: torch.Tensor, bits: int, *, scheme: str = "symmetric", group_size: int | None = None,
                  per_tensor: bool = False) -> torch.Tensor:
    """Quantize and dequantize a 2-D weight at the given granularity (for lessons and error studies)."""
    rows, cols = w.shape
    if per_tensor:
        groups, padded = w.reshape(1, -1), cols
    else:
        groups, padded = to_groups(w, group_size)
    if scheme == "symmetric":
        deq = dequantize_symmetric(*quantize_symmetric(groups, bits))
    elif scheme == "asymmetric":
        deq = dequantize_asymmetric(*quantize_asymmetric(groups, bits))
    elif scheme == "minmax":
        deq = dequantize_minmax(*quantize_minmax(groups, bits))
    elif scheme == "nf4":
        deq = dequantize_nf4(*quantize_nf4(groups.reshape(-1), groups.shape[1]))
    else:
        raise LabkitError(f"scheme={scheme!r} is not supported; use 'symmetric', 'asymmetric', 'minmax' or 'nf4'")
    return deq.reshape(rows, padded)[:, :cols].to(w.dtype) if not per_tensor else deq.reshape(rows, cols).to(w.dtype)


# ------------------------------------------------------------------------------------------------ NF4


def nf4_code(offset: float = 0.9677083) -> torch.Tensor:
    """The 16 NF4 values, built as QLoRA does: normal quantiles, 8 positive and 7 negative, plus an exact 0.

    ``offset`` is where the outermost quantile sits: 0.9677083, the constant bitsandbytes' ``create_normal_map``
    hard-codes (the QLoRA paper does not derive it). One reading that reproduces it is the mean of ``1 - 1/(2*15)``
    and ``1 - 1/(2*16)``, half a step in from the ends of a 15-step and a 16-step grid:
    ``0.5 * ((1 - 1/30) + (1 - 1/32)) = 0.9677083`` — an explanation, not the paper's reasoning. Using 1 would put
    the outermost value at an infinite quantile.
    """
    normal = torch.distributions.Normal(0.0, 1.0)
    pos = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (values / values.abs().max()).float()


NF4_CODE = nf4_code()
_NF4_ON: dict[torch.device, torch.Tensor] = {}


def nf4_code_on(device: torch.device) -> torch.Tensor:
    """The NF4 table on ``device``, copied there once and shared by every layer (a per-forward ``.to(device)``
    would be a host-to-device copy, and a sync, in every NF4 matmul)."""
    if device not in _NF4_ON:
        _NF4_ON[device] = NF4_CODE.to(device)
    return _NF4_ON[device]


def quantize_nf4(x: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise NF4: each block of ``blocksize`` values is scaled by its absmax and snapped to the nearest
    NF4 value. ``x`` is flattened (and zero-padded to whole blocks). Returns uint8 codes 0..15 and absmax."""
    check_group_size(blocksize)
    flat = x.reshape(-1).float()
    n_blocks = math.ceil(flat.numel() / blocksize)
    flat = torch.nn.functional.pad(flat, (0, n_blocks * blocksize - flat.numel())).view(n_blocks, blocksize)
    absmax = flat.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    normed = flat / absmax
    code = nf4_code_on(x.device)
    midpoints = (code[1:] + code[:-1]) / 2
    idx = torch.bucketize(normed, midpoints)  # nearest code value
    return idx.to(torch.uint8).reshape(-1), absmax.reshape(-1)


def dequantize_nf4(codes: torch.Tensor, absmax: torch.Tensor, numel: int | None = None) -> torch.Tensor:
    blocksize = codes.numel() // absmax.numel()
    out = nf4_code_on(codes.device)[codes.long()].view(-1, blocksize) * absmax.float().view(-1, 1)
    out = out.reshape(-1)
    return out if numel is None else out[:numel]


def double_quantize(absmax: torch.Tensor, blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize the fp32 absmax constants themselves to 8 bits (QLoRA's double quantization).

    The mean is subtracted first (absmax values are all positive), then each block of ``blocksize``
    constants gets a symmetric int8 scale. Returns int8 codes, fp32 per-block scales, and the fp32 mean.
    """
    offset = absmax.float().mean()
    centred = absmax.float() - offset
    n_blocks = math.ceil(centred.numel() / blocksize)
    padded = torch.nn.functional.pad(centred, (0, n_blocks * blocksize - centred.numel())).view(n_blocks, blocksize)
    q, scale = quantize_symmetric(padded, 8)
    return q.reshape(-1)[: absmax.numel()], scale.reshape(-1), offset.reshape(1)


def double_dequantize(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                      blocksize: int = 256) -> torch.Tensor:
    padded = torch.nn.functional.pad(q.float(), (0, scale.numel() * blocksize - q.numel()))
    return (padded.view(-1, blocksize) * scale.view(-1, 1)).reshape(-1)[: q.numel()] + offset


# -------------------------------------------------------------------------------------------- packing


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (uint8 values 0..15, even count) two per byte: low nibble first."""
    if codes.numel() % 2:
        raise LabkitError(f"pack_int4 needs an even number of codes, got {codes.numel()}")
    c = codes.reshape(-1).to(torch.uint8)
    return (c[0::2] & 0xF) | ((c[1::2] & 0xF) << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`."""
    p = packed.reshape(-1)
    return torch.stack([p & 0xF, p >> 4], dim=1).reshape(-1)


# ---------------------------------------------------------------------------------------------- error


def sqnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``20 * log10(||x|| / ||x - y||)`` (inf if identical)."""
    x, y = x.detach().float(), y.detach().float()
    noise = torch.linalg.vector_norm((x - y).reshape(-1))
    signal = torch.linalg.vector_norm(x.reshape(-1))
    if noise == 0:
        return math.inf
    return float(20 * torch.log10(signal / noise))
