"""Per-layer sensitivity: prune one layer at a time, measure, and let the curve propose per-layer ratios.

Layers differ: a network's first conv or an LLM's attention output may collapse at 30% while a wide MLP shrugs
off 80%. A uniform ratio is limited by the most sensitive layer; the scan finds which ones those are.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from labkit import LabkitError
from labkit.prune.unstructured import check_sparsity, global_magnitude_masks, prunable_layers
from labkit.skip import DEFAULT_SKIP


def scan(model: nn.Module, evaluate: Callable[[nn.Module], float], sparsities: Iterable[float] = (0.3, 0.5, 0.7, 0.9),
         *, layers: Iterable[str] | None = None, skip: Iterable[str] = DEFAULT_SKIP, progress: bool = False
         ) -> list[dict]:
    """``evaluate(model)`` with one layer at a time magnitude-pruned to each sparsity (weights restored after).

    Rows ``{"layer", "sparsity", "metric"}``, plus ``{"layer": "dense", "sparsity": 0}``.
    """
    sparsities = [check_sparsity(s) for s in sparsities]
    all_layers = dict(prunable_layers(model, skip))
    names = list(all_layers) if layers is None else list(layers)
    for n in names:
        if n not in all_layers:
            raise LabkitError(f"layers names {n!r}, which is not a prunable layer; known: {', '.join(all_layers)}")
    rows = [{"layer": "dense", "sparsity": 0.0, "metric": float(evaluate(model))}]
    bar = tqdm(total=len(names) * len(sparsities), desc="sensitivity scan", disable=not progress)
    for name in names:
        w = all_layers[name].weight
        saved = w.detach().clone()
        for s in sparsities:
            with torch.no_grad():
                w.copy_(saved * global_magnitude_masks([saved], s)[0])
            rows.append({"layer": name, "sparsity": s, "metric": float(evaluate(model))})
            bar.update(1)
        with torch.no_grad():
            w.copy_(saved)
    bar.close()
    return rows


def scan_channels(model: nn.Module, evaluate: Callable[[nn.Module], float],
                  ratios: Iterable[float] = (0.2, 0.4, 0.6, 0.8), *, example_inputs: Any,
                  ignored_layers: Iterable[nn.Module] = (), progress: bool = False) -> list[dict]:
    """The scan channel pruning needs: one layer at a time, a copy with ``ratio`` of that layer's output
    channels removed by Torch-Pruning (L2 importance; the batch norm and the next layer's inputs go with them),
    then ``evaluate(copy)``. :func:`scan` zeroes scattered *weights*, which says nothing about removing whole
    channels; this one measures what :func:`labkit.prune.prune_channels` would do.

    Rows ``{"layer", "sparsity", "metric", "params"}`` (``sparsity`` = the channel ratio), plus ``"dense"``:
    the same shape as :func:`scan`, so :func:`propose_ratios` reads both."""
    from labkit.measure import param_count
    from labkit.prune.structured import prune_channels

    ratios = [check_sparsity(r, "ratio") for r in ratios]
    ignored_ids = {id(m) for m in ignored_layers}
    if ignored_ids - {id(m) for m in model.modules()}:
        raise LabkitError("ignored_layers holds a module that is not part of this model (a layer of a copy?); "
                          "pass layers of the model you scan")
    roots = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
             and id(m) not in ignored_ids]
    if not roots:
        raise LabkitError(f"{type(model).__name__} has no Conv2d or Linear layer left to scan after ignored_layers")
    rows = [{"layer": "dense", "sparsity": 0.0, "metric": float(evaluate(model)), "params": param_count(model)}]
    bar = tqdm(total=len(roots) * len(ratios), desc="channel sensitivity scan", disable=not progress)
    for name, _ in roots:
        for r in ratios:
            m = copy.deepcopy(model)
            mods = dict(m.named_modules())
            others = [mods[n] for n, _ in roots if n != name] + [mods[n] for n, x in model.named_modules()
                                                                 if id(x) in ignored_ids]
            prune_channels(m, example_inputs, r, ignored_layers=others, count_macs=False)
            rows.append({"layer": name, "sparsity": r, "metric": float(evaluate(m)), "params": param_count(m)})
            bar.update(1)
    bar.close()
    return rows


def propose_ratios(rows: list[dict], tolerance: float, *, higher_is_better: bool = True) -> dict[str, float]:
    """Per layer, the highest scanned sparsity whose metric stays within ``tolerance`` of the dense one
    (0 when none does): a starting point for per-layer ratios, since errors of layers add up when combined."""
    if tolerance < 0:
        raise LabkitError(f"tolerance={tolerance} must be >= 0 (the metric drop allowed per layer)")
    dense = next((r["metric"] for r in rows if r["layer"] == "dense"), None)
    if dense is None:
        raise LabkitError("rows have no 'dense' entry; pass the output of sensitivity.scan")
    out: dict[str, float] = {}
    for r in rows:
        if r["layer"] == "dense":
            continue
        drop = dense - r["metric"] if higher_is_better else r["metric"] - dense
        best = out.setdefault(r["layer"], 0.0)
        if drop <= tolerance and r["sparsity"] > best:
            out[r["layer"]] = r["sparsity"]
    return out
