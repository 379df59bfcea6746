"""GPTQ from scratch: 4-bit weights with second-order, column-by-column error compensation.

Round-to-nearest rounds every weight on its own. GPTQ (Frantar et al., 2022) quantizes one input column at
a time and pushes that column's rounding error onto the columns not yet quantized, weighted by the inverse
Hessian ``H = 2 X^T X`` of the layer's inputs ``X`` on calibration text — so the layer's *outputs* on real
inputs stay close, not just its weights. Groups of ``group_size`` columns share a scale and zero point,
computed when the quantizer reaches the group's first column (on the already-updated weights).

The result is an ordinary :class:`~labkit.quant.layers.Int4Linear`; only the choice of codes differs.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from labkit import LabkitError
from labkit.quant import kernels
from labkit.quant import primitives as prim
from labkit.quant.api import QuantReport, _set_module
from labkit.quant.layers import Int4Linear
from labkit.skip import DEFAULT_SKIP, is_skipped


def gptq_quantize_weight(w: torch.Tensor, h: torch.Tensor, *, group_size: int = 64, bits: int = 4,
                         percdamp: float = 0.01, blocksize: int = 128, act_order: bool = True
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ on one weight ``[out, in]`` with input Hessian ``h [in, in]`` (asymmetric, per group).

    ``act_order`` visits columns with the largest Hessian diagonal (the most-used inputs) first, so their
    error can still be compensated; groups stay *static* (scales fixed from the original weights) so
    the stored layout is the ordinary one. Scales are rounded to fp16 before use, exactly as stored.
    Returns uint8 codes ``[out, in]``, and scales / zero points ``[out * in/group_size]``.
    """
    rows, cols = w.shape
    if cols % group_size:
        raise LabkitError(f"group_size={group_size} must divide in_features={cols}")
    w = w.detach().clone().float()
    h = h.detach().clone().float()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    # Static groups: one scale and zero per group of original columns, like round-to-nearest.
    _, s, z = prim.quantize_asymmetric(w.reshape(rows, cols // group_size, group_size), bits)
    scales, zeros = s.squeeze(-1).half().float(), z.squeeze(-1)  # [rows, n_groups]
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    group_of = perm // group_size  # group of each (permuted) column
    h += percdamp * torch.mean(torch.diag(h)) * torch.eye(cols, device=w.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=w.device)
    qmax = 2**bits - 1
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = group_of[i1 + i]
            scale, zero = scales[:, g], zeros[:, g]
            q = torch.clamp(torch.round(w1[:, i] / scale) + zero, 0, qmax)
            codes[:, i1 + i] = q.to(torch.uint8)
            err = (w1[:, i] - (q - zero) * scale) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    unpermuted = torch.empty_like(codes)
    unpermuted[:, perm] = codes
    return unpermuted, scales.reshape(-1), zeros.reshape(-1)


@torch.no_grad()
def collect_hessians(model: nn.Module, calib_ids: torch.Tensor, names: list[str], batch: int = 4,
                     progress: bool = True) -> dict[str, torch.Tensor]:
    """``H = 2/n * sum x x^T`` of the inputs of each named linear layer, over the calibration batches."""
    hs: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def fn(_mod, inputs, _out):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            if name not in hs:
                hs[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
                counts[name] = 0
            hs[name] += 2 * x.T @ x
            counts[name] += x.shape[0]
        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    dev = next(model.parameters()).device
    try:
        for i in tqdm(range(0, len(calib_ids), batch), desc="GPTQ calibration", disable=not progress):
            model(input_ids=calib_ids[i:i + batch].to(dev), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {n: hs[n] / counts[n] for n in names}


def gptq_quantize_(model: nn.Module, calib_ids: torch.Tensor, *, group_size: int = 64,
                   skip: tuple[str, ...] = DEFAULT_SKIP, progress: bool = True, kernel: str = "fused") -> QuantReport:
    """Quantize every ``nn.Linear`` (except ``skip``) of ``model`` in place with GPTQ, 4-bit asymmetric
    (``kernel`` as for :class:`~labkit.quant.api.Int4Config`).

    Hessians come from one pass of the full-precision model over ``calib_ids`` ``[n, seq_len]``.
    """
    kernels.check_kernel(kernel)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not is_skipped(n, skip)]
    report = QuantReport(skipped={n: f"matches skip pattern {skip}" for n, m in model.named_modules()
                                  if isinstance(m, nn.Linear) and n not in names})
    if not names:
        raise LabkitError("no nn.Linear layer is left to quantize; check skip")
    for name in names:  # every layer checked before any is swapped: never a half-quantized model
        cols = model.get_submodule(name).in_features
        if cols % group_size:
            raise LabkitError(f"group_size={group_size} must divide in_features={cols} of layer {name!r}")
    hessians = collect_hessians(model, calib_ids, names, progress=progress)
    done = {}
    for name in tqdm(names, desc="GPTQ layers", disable=not progress):  # quantize all, then swap all
        lin = model.get_submodule(name)
        codes, scale, zero = gptq_quantize_weight(lin.weight, hessians.pop(name), group_size=group_size)
        done[name] = Int4Linear(lin.in_features, lin.out_features, codes, scale, zero, group_size,
                                lin.bias, kernel).to(lin.weight.device)
    for name, layer in done.items():
        _set_module(model, name, layer)
        report.quantized.append(name)
    return report
