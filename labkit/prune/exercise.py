"""Notebook 02: global magnitude masks, checked against the kit's pruning."""

from __future__ import annotations

from collections.abc import Callable

import torch

from labkit.exercises._check import Mismatch, each, gen

NOTEBOOK = "02"


def _kit_global_masks(weights: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    from labkit.prune.unstructured import global_magnitude_masks

    return global_magnitude_masks(weights, sparsity)


def _check_global_masks(fn: Callable) -> str:
    g = gen(7)
    # layers of very different scales: a global threshold prunes the small-scale layer much harder
    weights = [
        torch.randn(16, 8, generator=g) * 0.1,
        torch.randn(32, 16, generator=g),
        torch.randn(10, 32, generator=g) * 3,
    ]
    total = sum(w.numel() for w in weights)
    for sparsity in each((0.0, 0.33, 0.5, 0.9)):  # 0.33 of 960 is 316.8: round() gives 317, int() 316
        got = fn(weights, sparsity)
        want = _kit_global_masks(weights, sparsity)
        if not isinstance(got, (list, tuple)) or len(got) != len(weights):
            raise Mismatch(f"return one mask per weight tensor ({len(weights)}), got {type(got).__name__}")
        for i, (m, w) in enumerate(zip(got, want)):
            if not isinstance(m, torch.Tensor) or tuple(m.shape) != tuple(w.shape):
                raise Mismatch(f"mask {i} must be a tensor of shape {tuple(w.shape)}")
        per_layer = [float((~m.bool()).float().mean()) for m in got]
        if sparsity > 0 and max(per_layer) - min(per_layer) < 0.05:
            raise Mismatch(f"sparsity={sparsity}: every layer lost the same fraction ({per_layer[0]:.2f}) — that is "
                           "layer-wise pruning; rank all weights together with one threshold")
        removed = sum(int((~m.bool()).sum()) for m in got)
        if removed != round(sparsity * total):
            hint = " (int() truncates; round the count)" if removed == int(sparsity * total) else ""
            raise Mismatch(f"sparsity={sparsity}: you remove {removed} of {total} weights; expected exactly "
                           f"round({sparsity} × {total}) = {round(sparsity * total)}{hint}")
        for i, (m, w) in enumerate(zip(got, want)):
            if not torch.equal(m.bool(), w):
                raise Mismatch(f"sparsity={sparsity}: mask {i} keeps different weights than the global |w| ranking "
                               "(prune the smallest absolute values, keep the largest)")
    return "one global |w| threshold, exact count, small-scale layers pruned hardest"


# name: (the kit's function, its checker)
EXERCISES = {"global_magnitude_masks": (_kit_global_masks, _check_global_masks)}
