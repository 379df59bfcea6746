"""Structured pruning: remove whole channels, neurons and attention heads so the model really shrinks.

Three steps kept apart, as Torch-Pruning does: *score* (an importance per channel), *select* (the lowest
``ratio`` of each group of coupled channels), *cut* (physically slice every layer the group touches: a conv's
output channels, the next conv's inputs, a linear layer's rows...). Torch-Pruning's ``DependencyGraph`` finds the
coupled layers by tracing the model; here it does the MLP channels of CNNs and LLMs. Attention heads under
grouped-query attention are cut by :func:`prune_attention_heads`, written out, because a query head may only go
together with the other query heads of its key/value group.

Importance: ``"l2"``/``"l1"`` look at weights alone; ``"taylor"`` (LLM-Pruner) scores ``|w · ∂L/∂w|`` with
gradients from calibration data (``labkit.data``), i.e. how much the loss on real inputs would change without the
channel; ``"random"`` is the control.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from labkit import LabkitError
from labkit.measure import param_count
from labkit.prune.unstructured import check_sparsity

IMPORTANCES = ("l2", "l1", "taylor", "random")


def importance(name: str):
    """The Torch-Pruning importance criterion called ``name`` (one of :data:`IMPORTANCES`)."""
    import torch_pruning as tp

    if name not in IMPORTANCES:
        raise LabkitError(f"importance={name!r} does not exist; use one of {IMPORTANCES}")
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    if name == "random":
        return tp.importance.RandomImportance()
    return tp.importance.GroupMagnitudeImportance(p=2 if name == "l2" else 1)


@dataclass
class PruneResult:
    """What a structured pruning step did: sizes before/after and each cut layer's shape change."""

    params_before: int
    params_after: int
    macs_before: int | None = None
    macs_after: int | None = None
    seconds: float = 0.0
    layers: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before

    def as_dict(self) -> dict[str, Any]:
        return {"params_before": self.params_before, "params_after": self.params_after,
                "params_ratio": self.params_ratio, "macs_before": self.macs_before, "macs_after": self.macs_after,
                "seconds": round(self.seconds, 2)}


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and isinstance(getattr(m, "weight", None), torch.Tensor)}


def accumulate_gradients(model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                         batches: Iterable[Any]) -> int:
    """Sum ``loss_fn(model, batch)`` gradients into ``.grad`` over calibration ``batches`` (Taylor importance)."""
    model.zero_grad(set_to_none=True)
    n = 0
    for batch in batches:
        loss_fn(model, batch).backward()
        n += 1
    if n == 0:
        raise LabkitError("calibration gave no batch: Taylor importance needs at least one")
    return n


def _check_keeps_channels(layers: list[tuple[str, nn.Module]], ratio: float, round_to: int | None) -> None:
    for name, m in layers:
        n = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        keep = int(n * (1 - ratio))  # what torch-pruning keeps
        if round_to:
            keep = (keep // round_to) * round_to
        if keep < 1:
            raise LabkitError(f"ratio={ratio} would remove every one of the {n} output channels of layer {name!r}"
                              + (f" (after rounding to multiples of {round_to})" if round_to else "")
                              + f"; use a ratio below {1 - max(1, round_to or 1) / n:.3f}")


def prune_channels(model: nn.Module, example_inputs: Any, ratio: float, *, importance_name: str = "l2",
                   ignored_layers: Iterable[nn.Module] = (), calibration: Callable[[nn.Module], Any] | None = None,
                   round_to: int | None = None, output_transform: Callable | None = None,
                   count_macs: bool = True) -> PruneResult:
    """Remove ``ratio`` of the output channels of every layer group Torch-Pruning finds (in place).

    ``calibration(model)`` is called before selection (it fills gradients for ``"taylor"``); layers in
    ``ignored_layers`` keep their outputs (e.g. a classifier's classes, an LLM's hidden size).
    """
    import torch_pruning as tp

    check_sparsity(ratio, "ratio")
    crit = importance(importance_name)
    ignored = list(ignored_layers)
    ignored_ids = {id(m) for m in ignored}
    roots = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
             and id(m) not in ignored_ids]
    _check_keeps_channels(roots, ratio, round_to)
    before = _shapes(model)
    t0 = time.perf_counter()
    params0 = param_count(model)
    try:
        with warnings.catch_warnings():  # torch-pruning notes norm weights it would prune along their last dim
            warnings.filterwarnings("ignore", message="(?s).*unwrapped_parameters")
            pruner = tp.pruner.MetaPruner(model, example_inputs, importance=crit, pruning_ratio=ratio,
                                          ignored_layers=ignored, round_to=round_to,
                                          output_transform=output_transform, unwrapped_parameters=[])
        macs0 = macs(model, example_inputs) if count_macs else None
    except Exception as exc:  # tracing failures surface as many exception types
        raise LabkitError(
            f"torch-pruning could not trace {type(model).__name__} with the given example_inputs "
            f"({type(exc).__name__}: {exc}); pass inputs its forward accepts (for a transformers LM: "
            "{'input_ids': ids}, config.use_cache=False, output_transform=lambda out: out.logits)"
        ) from exc
    if importance_name == "taylor":
        if calibration is None:
            raise LabkitError("importance='taylor' needs calibration=fn(model) that fills gradients on real data")
        calibration(model)
    pruner.step()
    model.zero_grad(set_to_none=True)
    after = _shapes(model)
    changed = {n: (before[n], after[n]) for n in after if n in before and before[n] != after[n]}
    return PruneResult(params0, param_count(model), macs0,
                       macs(model, example_inputs) if count_macs else None,
                       time.perf_counter() - t0, changed)


def macs(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of one forward on ``example_inputs`` (Torch-Pruning's counter)."""
    import torch_pruning as tp

    with torch.no_grad():
        macs, _ = tp.utils.count_ops_and_params(model, example_inputs)
    return int(macs)


# ------------------------------------------------------------------------------------------------ CNN

def prune_cnn(model: nn.Module, ratio: float, *, importance_name: str = "l2",
              calibration: tuple[torch.Tensor, torch.Tensor] | None = None) -> PruneResult:
    """Remove ``ratio`` of every conv's channels and every hidden linear layer's neurons; the last linear layer
    (the classes) is kept. ``calibration=(x, y)`` labelled images for Taylor importance."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise LabkitError(f"{type(model).__name__} has no Linear classifier layer to keep")
    example = torch.zeros(1, *_input_shape(model), device=next(model.parameters()).device)

    def calib(m: nn.Module) -> None:
        x, y = calibration
        accumulate_gradients(m, lambda mm, b: nn.functional.cross_entropy(mm(b[0]), b[1]), [(x, y)])

    return prune_channels(model, example, ratio, importance_name=importance_name, ignored_layers=[linears[-1]],
                          calibration=calib if calibration is not None else None)


def _input_shape(model: nn.Module) -> tuple[int, ...]:
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise LabkitError(f"{type(model).__name__} has no Conv2d layer; prune_cnn expects an image model")
    return (first.in_channels, 8, 8)


# ------------------------------------------------------------------------------------------------ LLM

def _lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def _taylor_calibration(calibration_ids: torch.Tensor | None, batch_size: int):
    if calibration_ids is None:
        return None

    def calib(m: nn.Module) -> None:
        accumulate_gradients(m, _lm_loss, calibration_ids.split(batch_size))
    return calib


def prune_llm_mlp(model: nn.Module, ratio: float, *, importance_name: str = "taylor",
                  calibration_ids: torch.Tensor | None = None, round_to: int | None = 8,
                  batch_size: int = 2) -> PruneResult:
    """Remove ``ratio`` of every decoder layer's MLP intermediate channels (gate/up rows, down columns) of a
    Llama-shaped transformers causal LM, and update ``config.intermediate_size`` so it saves and reloads.

    Only gate/up outputs are pruning roots; attention, embeddings, ``down_proj`` outputs (the hidden size) and
    ``lm_head`` are kept. ``calibration_ids`` ``[n, L]`` give Taylor importance its gradients.
    """
    layers = _decoder_layers(model)
    ignored: list[nn.Module] = [model.get_output_embeddings(), model.get_input_embeddings()]
    for layer in layers:
        ignored += list(layer.self_attn.modules())[1:] + [layer.mlp.down_proj]
    model.config.use_cache = False
    example = {"input_ids": torch.zeros(1, 8, dtype=torch.long, device=model.device)}
    res = prune_channels(model, example, ratio, importance_name=importance_name, ignored_layers=ignored,
                         calibration=_taylor_calibration(calibration_ids, batch_size), round_to=round_to,
                         output_transform=lambda out: out.logits, count_macs=False)
    sizes = {layer.mlp.gate_proj.out_features for layer in layers}
    if len(sizes) != 1:  # uniform ratio keeps one size; a config cannot describe per-layer sizes
        raise LabkitError(f"layers ended with different MLP widths {sorted(sizes)}; use one ratio for all layers")
    model.config.intermediate_size = sizes.pop()
    return res


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(layer, "mlp") and hasattr(layer, "self_attn") for layer in layers):
        raise LabkitError(f"{type(model).__name__} is not a Llama-shaped causal LM (model.model.layers[i].mlp / "
                          ".self_attn); structured LLM pruning supports Llama, Mistral, Qwen2 and SmolLM2")
    return list(layers)


def heads_to_remove(num_heads: int, num_kv_heads: int, ratio: float) -> int:
    """Query heads to remove from each key/value group for ``ratio``, or a clear error if it is not whole.

    Under grouped-query attention every key/value head serves ``num_heads / num_kv_heads`` query heads; removing
    the same number from each group keeps the model a valid GQA model.
    """
    check_sparsity(ratio, "ratio")
    per_group = num_heads // num_kv_heads
    k = ratio * per_group
    if abs(k - round(k)) > 1e-6 or round(k) >= per_group:
        allowed = ", ".join(f"{i}/{per_group}" for i in range(per_group))
        raise LabkitError(f"ratio={ratio} removes {k:.3g} of the {per_group} query heads in each of the {num_kv_heads} "
                          f"key/value groups; heads must stay whole and one must remain per group: allowed ratios "
                          f"are {allowed}")
    return round(k)


def prune_attention_heads(model: nn.Module, ratio: float, *, importance_name: str = "taylor",
                          calibration_ids: torch.Tensor | None = None, batch_size: int = 2) -> PruneResult:
    """Remove ``ratio`` of the query heads of each key/value group in every layer (in place, GQA kept).

    A head's score is the L2 norm of all its weights together, ``sqrt(‖W_q[head]‖² + ‖W_o[:, head]‖²)``
    (``"l2"``, the group norm Torch-Pruning uses), or the Taylor sum ``Σ|w · ∂L/∂w|`` over the same weights
    (``"taylor"``, gradients from ``calibration_ids``). Key/value projections are untouched; the
    config's ``num_attention_heads`` (and an explicit ``head_dim``) are updated so the model saves and reloads.
    """
    if importance_name not in ("l2", "taylor"):
        raise LabkitError(f"importance={importance_name!r} is not allowed for heads; use 'l2' or 'taylor'")
    layers = _decoder_layers(model)
    cfg = model.config
    h, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    remove = heads_to_remove(h, kv, ratio)
    head_dim = layers[0].self_attn.head_dim
    t0, params0 = time.perf_counter(), param_count(model)
    before = _shapes(model)
    if importance_name == "taylor":
        if calibration_ids is None:
            raise LabkitError("importance='taylor' needs calibration_ids (token ids [n, L] of calibration text)")
        accumulate_gradients(model, _lm_loss, calibration_ids.split(batch_size))
    per_group = h // kv
    with torch.no_grad():
        for layer in layers:
            attn = layer.self_attn
            score = _head_scores(attn.q_proj.weight, attn.o_proj.weight, h, head_dim, importance_name)
            keep = []
            for g in range(kv):
                heads = torch.arange(g * per_group, (g + 1) * per_group)
                kept = heads[score[heads].argsort(descending=True)[: per_group - remove]].sort().values
                keep += kept.tolist()
            rows = torch.cat([torch.arange(i * head_dim, (i + 1) * head_dim) for i in keep])
            _slice_linear(attn.q_proj, rows, dim=0)
            _slice_linear(attn.o_proj, rows, dim=1)
            attn.num_key_value_groups = per_group - remove
    model.zero_grad(set_to_none=True)
    cfg.head_dim = head_dim  # otherwise hidden_size // num_attention_heads would be recomputed on reload
    cfg.num_attention_heads = kv * (per_group - remove)
    after = _shapes(model)
    return PruneResult(params0, param_count(model), seconds=time.perf_counter() - t0,
                       layers={n: (before[n], after[n]) for n in after if before.get(n) != after[n]})


def _head_scores(wq: torch.Tensor, wo: torch.Tensor, h: int, head_dim: int, how: str) -> torch.Tensor:
    def per_head(w: torch.Tensor, g: torch.Tensor | None, rows: bool) -> torch.Tensor:
        x = (w * g).abs() if how == "taylor" else w.pow(2)
        x = x.view(h, head_dim, -1) if rows else x.view(x.shape[0], h, head_dim).transpose(0, 1)
        return x.sum(dim=(1, 2))

    s = per_head(wq, wq.grad, True) + per_head(wo, wo.grad, False)
    return s if how == "taylor" else s.sqrt()


def _slice_linear(layer: nn.Linear, index: torch.Tensor, dim: int) -> None:
    layer.weight = nn.Parameter(layer.weight.index_select(dim, index.to(layer.weight.device)).contiguous())
    if dim == 0:
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias[index].contiguous())
        layer.out_features = len(index)
    else:
        layer.in_features = len(index)


# ------------------------------------------------------------------------------------------------ save / reload

def resize_to_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Reshape a freshly built (dense) model's layers to a pruned checkpoint's shapes, then load it.

    The usual failure of pruned checkpoints — ``size mismatch`` on ``load_state_dict`` — comes from building the
    original architecture; this gives every Linear/Conv2d/norm the saved shapes (and fixes ``in_features`` /
    ``out_channels`` ...) before loading, so any model pruned by this module reloads.
    """
    with torch.no_grad():
        for name, m in model.named_modules():
            for pname, p in list(m.named_parameters(recurse=False)):
                key = f"{name}.{pname}" if name else pname
                if key in state_dict and tuple(state_dict[key].shape) != tuple(p.shape):
                    setattr(m, pname, nn.Parameter(torch.empty_like(state_dict[key], dtype=p.dtype)))
            w = getattr(m, "weight", None)
            if isinstance(m, nn.Linear):
                m.out_features, m.in_features = w.shape
            elif isinstance(m, nn.Conv2d):
                m.out_channels, m.in_channels = w.shape[0], w.shape[1] * m.groups
            elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) and w is not None:
                if isinstance(m, nn.BatchNorm2d):
                    m.num_features = w.shape[0]
                    for b in ("running_mean", "running_var"):
                        key = f"{name}.{b}"
                        if key in state_dict:
                            setattr(m, b, torch.empty_like(state_dict[key]))
                else:
                    m.normalized_shape = tuple(w.shape)
    model.load_state_dict(state_dict, strict=True)
    return model


def save_pruned(model: nn.Module, path) -> None:
    """Save a pruned model so it reloads with its new shape: a transformers model via ``save_pretrained`` (the
    config carries the new sizes), any other module as safetensors (shapes are in the tensors). Atomic."""
    from safetensors.torch import save_file

    from labkit.atomic import atomic

    with atomic(path, directory=hasattr(model, "save_pretrained")) as tmp:
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(tmp)
        else:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)


def load_pruned(path, model: nn.Module | None = None) -> nn.Module:
    """Reload what :func:`save_pruned` wrote: a transformers directory (``AutoModelForCausalLM``), or a
    safetensors file into ``model`` (a freshly built dense instance of the same class) via
    :func:`resize_to_state_dict`."""
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path).eval()
    if model is None:
        raise LabkitError(f"{path} holds tensors only; pass model= a freshly built instance of its architecture")
    from safetensors.torch import load_file

    return resize_to_state_dict(model, load_file(path)).eval()
