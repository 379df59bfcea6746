"""One matmul for projections that read the same input: q/k/v, and gate/up, stacked by rows.

A Llama layer makes seven weight matmuls a token; q, k and v all read the same normed input, and so do gate and
up. Stacking their weights row-wise gives one matmul each, ``x @ cat(Wq, Wk, Wv).T = cat(x @ Wq.T, ...)``, so a
decode step calls four kernels a layer instead of seven: fewer calls, each one longer, which is what a kernel with
a fixed cost per call wants at batch 1. The stacking is exact for the quantized layouts too: int8 keeps one scale
per output row and int4 one scale (and zero) per group *within* a row, so every row carries its own constants. A
quantized layer type stacks itself (its ``concat_rows`` class method: :class:`labkit.quant.layers.Int8Linear`,
:class:`~labkit.quant.layers.Int4Linear`), so this module knows plain ``nn.Linear`` only and the Llama forward
(:mod:`labkit.llama`) can use it without importing a technique. Checked in tests/test_stacking.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


def _bias(mods: Sequence[nn.Module]) -> tuple[bool, torch.Tensor | None]:
    """(can stack, the stacked bias): every module has a bias, or none has."""
    biases = [m.bias for m in mods]
    if all(b is None for b in biases):
        return True, None
    if any(b is None for b in biases):
        return False, None
    return True, torch.cat([b.detach() for b in biases])


def concat_rows(mods: Sequence[nn.Module]) -> nn.Module | None:
    """One layer computing ``torch.cat([m(x) for m in mods], -1)`` with a single matmul, or None where these
    modules cannot be stacked (different types, input sizes, dtypes, kernels or constants' layout). Layer types
    other than ``nn.Linear`` stack through their ``concat_rows(mods, bias)`` class method, if they have one.
    The result is
    a new layer holding a copy of the stacked weights; ``mods`` are not changed."""
    first = mods[0]
    same = all(type(m) is type(first) and m.in_features == first.in_features for m in mods)
    ok, bias = _bias(mods)
    if not (same and ok):
        return None
    out = sum(m.out_features for m in mods)
    if type(first) is nn.Linear:
        if len({(m.weight.dtype, m.weight.device) for m in mods}) > 1:
            return None
        layer = nn.Linear(first.in_features, out, bias=bias is not None, device=first.weight.device,
                          dtype=first.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(torch.cat([m.weight for m in mods]))
            if bias is not None:
                layer.bias.copy_(bias)
        return layer.requires_grad_(False)
    stacker = getattr(type(first), "concat_rows", None)  # a quantized layer type knows its own layout
    return stacker(mods, bias) if stacker is not None else None


class Stacked(nn.Module):
    """The projections of one input as registered submodules (so ``.to()`` and ``state_dict`` see them): one
    stacked layer where ``fuse`` and the modules allow (:func:`concat_rows`), else each module alone. Calling it
    returns every projection, in order (split from the stacked matmul where there is one)."""

    def __init__(self, mods: Sequence[nn.Module], fuse: bool = True) -> None:
        super().__init__()
        one = concat_rows(mods) if fuse else None
        self.parts = nn.ModuleList([one] if one is not None else list(mods))
        self.sizes = [tuple(m.out_features for m in mods)] if one is not None else [(m.out_features,) for m in mods]

    def __len__(self) -> int:
        """How many matmuls the projections take (1 when stacked)."""
        return len(self.parts)

    def forward(self, x: torch.Tensor,
                linear: Callable[[nn.Module, torch.Tensor], torch.Tensor] = lambda m, x: m(x)) -> list[torch.Tensor]:
        return [
            part for module, sizes in zip(self.parts, self.sizes) for part in linear(module, x).split(sizes, dim=-1)
        ]


def stack(mods: Sequence[nn.Module], fuse: bool = True) -> Stacked:
    """:class:`Stacked` over ``mods``."""
    return Stacked(mods, fuse)


def project(group: Stacked, x: torch.Tensor,
            linear: Callable[[nn.Module, torch.Tensor], torch.Tensor] = lambda m, x: m(x)) -> list[torch.Tensor]:
    """Every projection of ``x`` in the group, in order."""
    return group(x, linear)
