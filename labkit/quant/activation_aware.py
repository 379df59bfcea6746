"""Quantization that looks at the activations: LLM.int8's outlier split, SmoothQuant and AWQ, from scratch.

Weight-only schemes (``primitives``) never see the inputs. Three methods courses teach do:

- **LLM.int8()** (Dettmers et al., 2022, arXiv:2208.07339): a few input features of an LLM's hidden states carry
  magnitudes far above the rest (≥ 6.0, its threshold). Quantizing them with everything else wastes the int8 grid,
  so ``int8_decomposed_matmul`` multiplies those columns in floating point and the rest in int8 (absmax per row of
  ``x``, per output row of ``w``: "vector-wise"), and adds the two.
- **SmoothQuant** (Xiao et al., 2023, arXiv:2211.10438): to quantize activations *and* weights to int8 (W8A8), move
  the difficulty from the activations to the weights with a per-input-channel scale
  ``s_j = max|X_j|^α / max|W_j|^(1-α)`` (α = 0.5): ``X W^T = (X / s)(W s)^T`` exactly, and both factors are easier
  to quantize. ``smooth_scales`` computes ``s``; ``w8a8_matmul`` is the int8 × int8 product.
- **AWQ** (Lin et al., 2024, arXiv:2306.00978): for weight-only int4, the input channels with large *average*
  activation matter most. Scale those weight columns up before quantizing (and the input down), with
  ``s = mean|X|^α`` normalised, α searched on a grid of 20 for the least output error on calibration inputs:
  ``awq_scales``.

Each function is a pure tensor function; ``tests/quant/test_activation_aware.py`` checks the exact identities,
that each method beats its naive counterpart on inputs with outliers, and LLM.int8's split against bitsandbytes.
"""

from __future__ import annotations

import torch

from labkit import LabkitError
from labkit.quant.primitives import dequantize_symmetric, fake_quantize, quantize_symmetric, sqnr

LLM_INT8_THRESHOLD = 6.0  # LLM.int8()'s outlier threshold (bitsandbytes' default llm_int8_threshold)


def _check_2d(x: torch.Tensor, w: torch.Tensor) -> None:
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise LabkitError(f"x {tuple(x.shape)} and w {tuple(w.shape)} must be [tokens, in] and [out, in]")


def outlier_columns(x: torch.Tensor, threshold: float = LLM_INT8_THRESHOLD) -> torch.Tensor:
    """The input features (columns of ``x [tokens, in]``) where any value reaches ``threshold`` in magnitude."""
    if not threshold > 0:
        raise LabkitError(f"threshold={threshold!r} must be above 0")
    return (x.abs() >= threshold).any(dim=0)


def int8_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` with both in int8, absmax per row of ``x`` (per token) and per row of ``w`` (per output): the
    integer product is exact (int32 in a real kernel; here float64 holds it exactly), then scaled back."""
    _check_2d(x, w)
    qx, sx = quantize_symmetric(x, 8, dim=1)
    qw, sw = quantize_symmetric(w, 8, dim=1)
    return (qx.double() @ qw.double().T).float() * sx * sw.T


def int8_decomposed_matmul(x: torch.Tensor, w: torch.Tensor, threshold: float = LLM_INT8_THRESHOLD
                           ) -> torch.Tensor:
    """LLM.int8(): the outlier columns of ``x`` (and the matching columns of ``w``) in floating point, the rest int8."""
    _check_2d(x, w)
    out = outlier_columns(x, threshold)
    y = torch.zeros(x.shape[0], w.shape[0], dtype=torch.float32, device=x.device)
    if (~out).any():
        y += int8_matmul(x[:, ~out], w[:, ~out])
    if out.any():
        y += x[:, out].float() @ w[:, out].float().T
    return y


def smooth_scales(act_absmax: torch.Tensor, w: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant's per-input-channel scale ``s_j = max|X_j|^α / max|W_j|^(1-α)`` (``act_absmax [in]``: the
    calibration inputs' max ``|x|`` per channel; ``w [out, in]``; ``w``'s columns may stack several layers' rows)."""
    if not 0 <= alpha <= 1:
        raise LabkitError(f"alpha={alpha!r} must lie in [0, 1] (SmoothQuant uses 0.5)")
    if act_absmax.shape != (w.shape[1],):
        raise LabkitError(f"act_absmax has shape {tuple(act_absmax.shape)}; one value per input channel "
                          f"({w.shape[1]}) expected")
    w_absmax = w.abs().amax(dim=0).float()
    tiny = 1e-5
    return (act_absmax.float().clamp(min=tiny) ** alpha / w_absmax.clamp(min=tiny) ** (1 - alpha)).clamp(min=tiny)


def w8a8_matmul(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8: ``x @ w.T`` with activations and weights int8. With SmoothQuant ``scales`` the product runs on
    ``x / s`` and ``w * s`` (in a model, ``1/s`` is folded into the preceding norm's weight, so it costs nothing)."""
    _check_2d(x, w)
    if scales is not None:
        x, w = x / scales, w * scales
    return int8_matmul(x, w)


def awq_scales(x: torch.Tensor, w: torch.Tensor, bits: int = 4, group_size: int = 128, grid: int = 20
               ) -> tuple[torch.Tensor, float]:
    """AWQ's search: ``s = mean|X|^α`` (normalised so max·min = 1) for α in ``0, 1/grid, …, (grid-1)/grid``, keeping
    the α whose fake-quantized ``(w * s)`` applied to ``x / s`` is closest (MSE) to ``x @ w.T``. Returns (s, α);
    quantize ``w * s`` and divide the input by ``s`` (foldable into the previous op)."""
    _check_2d(x, w)
    if not isinstance(grid, int) or grid < 1:
        raise LabkitError(f"grid={grid!r} must be a positive integer")
    ref = x.float() @ w.float().T
    mean_abs = x.abs().float().mean(dim=0).clamp(min=1e-4)
    best: tuple[float, torch.Tensor, float] | None = None
    for i in range(grid):
        alpha = i / grid
        s = mean_abs ** alpha
        s = s / (s.max() * s.min()).sqrt()
        wq = fake_quantize(w.float() * s, bits, scheme="symmetric", group_size=group_size)
        err = float(((x.float() / s) @ wq.T - ref).pow(2).mean())
        if best is None or err < best[0]:
            best = (err, s, alpha)
    assert best is not None
    return best[1], best[2]


def awq_matmul(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bits: int = 4, group_size: int = 128
               ) -> torch.Tensor:
    """``x @ w.T`` with ``w * scales`` fake-quantized (the weight-only path AWQ ships) and the input divided back."""
    _check_2d(x, w)
    return (x.float() / scales) @ fake_quantize(w.float() * scales, bits, scheme="symmetric", group_size=group_size).T


def per_tensor_int8(x: torch.Tensor) -> torch.Tensor:
    """``x`` through one absmax int8 scale for the whole tensor: what a single outlier does to everything else."""
    q, s = quantize_symmetric(x.reshape(1, -1), 8)
    return dequantize_symmetric(q, s).reshape(x.shape)


def layer_inputs(model: torch.nn.Module, input_ids: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """The inputs each named linear layer sees on ``input_ids``, as ``[tokens, in]`` (one forward, hooks removed)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: seen.__setitem__(n, args[0].detach().reshape(-1, args[0].shape[-1]).float()))
        for n in names]
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for h in hooks:
            h.remove()
    return seen


def compare_methods(x: torch.Tensor, w: torch.Tensor, group_size: int = 64) -> dict[str, float]:
    """Output SQNR (dB, against the float product) of every method here on one layer's real inputs ``x``, with
    the outlier columns LLM.int8 would split off and the α AWQ picked."""
    ref = x.float() @ w.float().T
    s_awq, alpha = awq_scales(x, w, bits=4, group_size=group_size)
    return {"max_abs_x": float(x.abs().max()), "outlier_columns": int(outlier_columns(x).sum()),
            "int8 (W8A8, per token)": sqnr(ref, int8_matmul(x, w)),
            "LLM.int8 split": sqnr(ref, int8_decomposed_matmul(x, w)),
            "SmoothQuant W8A8": sqnr(ref, w8a8_matmul(x, w, smooth_scales(x.abs().amax(dim=0), w))),
            f"int4 g{group_size} RTN": sqnr(ref, x.float() @ fake_quantize(w.float(), 4, group_size=group_size).T),
            f"int4 g{group_size} AWQ": sqnr(ref, awq_matmul(x, w, s_awq, 4, group_size)), "awq_alpha": alpha}
