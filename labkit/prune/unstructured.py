"""Unstructured magnitude pruning: zero the smallest weights, layer by layer or globally.

The lesson of this module is in :func:`csr_bytes`: a mask makes a model *sparse*, not smaller or faster. The
weights stay a dense tensor with zeros in it (``torch.nn.utils.prune`` even keeps a copy plus the mask until
:func:`make_permanent`), and sparse storage (CSR) only saves bytes once most weights are gone, because every
kept value needs an index beside it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils import prune

from labkit import LabkitError
from labkit.skip import DEFAULT_SKIP, is_skipped

PRUNABLE = (nn.Linear, nn.Conv2d)
SCOPES = ("global", "layer")


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    """``sparsity`` as a float in [0, 1), or a clear error (1 would remove every weight)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise LabkitError(f"{name}={sparsity!r} is not allowed; use a fraction in [0, 1) (0.5 = half the weights)")
    return float(sparsity)


def prunable_layers(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every Linear/Conv2d not matching a ``skip`` pattern (:func:`labkit.skip.is_skipped`,
    the rule quantization uses); ``lm_head`` by default: in tied language models it *is* the embedding matrix."""
    skip = tuple(skip)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PRUNABLE) and not is_skipped(n, skip)]


def global_magnitude_masks(weights: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Boolean keep-masks removing exactly ``round(sparsity * total)`` of the smallest-``|w|`` weights overall.

    One threshold for all tensors: layers with many small weights lose more. Ties are broken by position, so the
    count is exact even when many weights are equal (e.g. already zero).
    """
    check_sparsity(sparsity)
    flat = torch.cat([w.detach().abs().flatten().float() for w in weights])
    k = round(sparsity * flat.numel())
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k:
        keep[torch.topk(flat, k, largest=False, sorted=False).indices] = False
    return [m.view_as(w) for m, w in zip(keep.split([w.numel() for w in weights]), weights)]


def magnitude_prune(model: nn.Module, sparsity: float, *, scope: str = "global",
                    skip: Iterable[str] = DEFAULT_SKIP) -> list[dict]:
    """Mask the smallest weights of every prunable layer with ``torch.nn.utils.prune`` (L1 magnitude).

    ``scope="global"`` ranks all weights together (exact total count); ``"layer"`` removes ``sparsity`` of each
    layer. The model keeps ``weight_orig`` + ``weight_mask`` until :func:`make_permanent`. Returns the per-layer
    :func:`sparsity_report`.
    """
    check_sparsity(sparsity)
    if scope not in SCOPES:
        raise LabkitError(f"scope={scope!r} is not allowed; use one of {SCOPES}")
    layers = prunable_layers(model, skip)
    if not layers:
        raise LabkitError(f"model has no Linear/Conv2d layer left to prune after skip={tuple(skip)}")
    if scope == "global":
        params = [(m, "weight") for _, m in layers]
        total = sum(m.weight.numel() for _, m in layers)
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=round(sparsity * total))
    else:
        for _, m in layers:
            prune.l1_unstructured(m, "weight", amount=sparsity)
    return sparsity_report(model, skip)


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Attach given keep-masks (``{layer name: bool mask}``) through ``torch.nn.utils.prune``."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        if name not in modules:
            raise LabkitError(f"masks name a layer {name!r} the model does not have")
        prune.custom_from_mask(modules[name], "weight", mask)


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold every mask into its weight (``prune.remove``): one dense tensor per layer again, zeros included."""
    for m in model.modules():
        if prune.is_pruned(m):
            for hook in [h for h in m._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)]:
                prune.remove(m, hook._tensor_name)
    return model


def sparsity_report(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP) -> list[dict]:
    """Per prunable layer: parameters, zeros and sparsity (of the effective, masked weight), then a total row."""
    rows = []
    for name, m in prunable_layers(model, skip):
        w = m.weight
        zeros = int((w == 0).sum())
        rows.append({"layer": name, "params": w.numel(), "zeros": zeros, "sparsity": zeros / w.numel()})
    n, z = sum(r["params"] for r in rows), sum(r["zeros"] for r in rows)
    rows.append({"layer": "total", "params": n, "zeros": z, "sparsity": z / n if n else 0.0})
    return rows


def nonzero_weights(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP) -> int:
    """Non-zero weights over the prunable layers (the :func:`sparsity_report` total, parameters minus zeros)."""
    total = sparsity_report(model, skip)[-1]
    return total["params"] - total["zeros"]


# --------------------------------------------------------------------------------- what sparse storage saves

def csr_bytes(weight: torch.Tensor, index_dtype: torch.dtype = torch.int64) -> int:
    """Bytes of ``weight`` (2-D, or flattened to rows) stored as CSR by torch: values + column indices + row
    pointers. torch stores int64 indices by default; int32 is what cuSPARSE/MKL also accept."""
    w = weight.detach().reshape(weight.shape[0], -1)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": storage is all we use
        warnings.simplefilter("ignore", UserWarning)
        csr = w.to_sparse_csr()
    index = torch.empty((), dtype=index_dtype).element_size()
    return (csr.values().numel() * w.element_size() + csr.col_indices().numel() * index
            + csr.crow_indices().numel() * index)


def csr_breakeven_sparsity(value_bytes: int = 4, index_bytes: int = 8) -> float:
    """Sparsity above which CSR is smaller than dense (ignoring row pointers): each kept value costs
    ``value + index`` bytes instead of ``value``, so density must fall below ``value / (value + index)``."""
    return 1 - value_bytes / (value_bytes + index_bytes)
