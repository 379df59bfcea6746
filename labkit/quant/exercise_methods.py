"""Notebook 01c: SmoothQuant's migration scales, checked against ``labkit.quant.activation_aware``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from labkit.exercises._check import Mismatch, close, each, gen
from labkit.quant.activation_aware import smooth_scales

NOTEBOOK = "01c"


def _check_smooth_scales(fn: Callable) -> str:
    g = gen(5)
    outlier = torch.rand(64, generator=g) * 0.5
    outlier[[3, 40]] = torch.tensor([60.0, 25.0])  # two outlier channels, as LLM activations have
    cases = [("random channels, alpha 0.5", torch.rand(64, generator=g) * 4, torch.randn(32, 64, generator=g), 0.5),
             ("two outlier channels, alpha 0.5", outlier, torch.randn(16, 64, generator=g) * 0.1, 0.5),
             ("alpha 0.8 (more onto the weights)", torch.rand(48, generator=g) + 0.1,
              torch.randn(8, 48, generator=g), 0.8),
             ("alpha 0 (weights alone decide)", torch.rand(16, generator=g), torch.randn(4, 16, generator=g), 0.0)]
    for label, act, w, alpha in each(cases):
        got = fn(act, w, alpha)
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != (w.shape[1],):
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise Mismatch(f"{label}: one scale per input channel, shape ({w.shape[1]},) expected; yours {shape}")
        close(got, smooth_scales(act, w, alpha), f"{label}: the scales", atol=1e-5, rtol=1e-4)
    x_max = float(outlier.max() / smooth_scales(outlier, cases[1][2], 0.5).max())
    return (f"scales as SmoothQuant's; on the outlier case the largest activation shrinks from "
            f"{float(outlier.max()):.0f} to {x_max:.2f} after dividing by its scale")


# name: (the kit's function, its checker)
EXERCISES = {"smooth_scales": (smooth_scales, _check_smooth_scales)}
