"""The one Llama forward the kit steps itself, shared by :class:`labkit.decode.StaticDecoder` (a static cache, batch
of sequences) and the paged engine's :class:`labkit.serve.model.PagedLlama` (a flattened batch over block tables),
and the one refusal both give for what they cannot serve exactly.

What differs between the two is only where K/V live and how attention reads them, so the layer loop takes
attention as a function: :func:`decoder_layers` runs norm → stacked q/k/v → rotary → ``attend`` → o_proj →
norm → stacked gate/up → down, for every layer. Hugging Face's model supplies the weights and the building blocks
(embedding, RMSNorm, rotary embedding, projections, activation); every projection is still the model's own module,
so quantized layers run unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from labkit import LabkitError
from labkit.stacking import Stacked, project, stack

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# attend(layer index, q [b, heads, n, d], k [b, kv_heads, n, d], v [b, kv_heads, n, d]), q and k rotated, K/V of
# the n new tokens only: stores them where the caller keeps its cache, attends, returns [b, n, heads * d]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Norm = Callable[[torch.Tensor, nn.Module], torch.Tensor]
Linear = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def check_supported(config: Any, who: str, context: int | None = None, context_name: str = "max_len") -> None:
    """Raise unless ``who`` can run a model of ``config`` exactly over ``context`` positions: a Llama-shaped
    decoder, attending over the whole context (a sliding window shorter than the context would need masking
    neither implementation does)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise LabkitError(f"model_type={model_type!r} is not supported by {who}; supported: "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama-shaped decoders)")
    window = getattr(config, "sliding_window", None)
    if context is not None and window and getattr(config, "use_sliding_window", True) and window < context:
        raise LabkitError(f"{context_name}={context} is past the model's sliding window ({window}); {who} attends "
                          f"over the whole context, so it would not match the model: use {context_name} <= {window}")


@dataclass(frozen=True)
class Dims:
    """The attention shape of a config: query heads, key/value heads (fewer under grouped-query attention), and
    each head's width."""

    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: Any) -> Dims:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_attention_heads, config.num_key_value_heads, head_dim)


def stacked_projections(model: nn.Module, fuse: bool = True) -> tuple[nn.ModuleList, nn.ModuleList]:
    """Every layer's q/k/v and gate/up as :class:`labkit.stacking.Stacked` (one matmul each where ``fuse`` and the
    layers allow; a copy of those weights, held as long as the caller keeps them)."""
    layers = model.model.layers
    qkv = nn.ModuleList(stack((ly.self_attn.q_proj, ly.self_attn.k_proj, ly.self_attn.v_proj), fuse)
                        for ly in layers)
    return qkv, nn.ModuleList(stack((ly.mlp.gate_proj, ly.mlp.up_proj), fuse) for ly in layers)


def _module_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    return norm(x)


def _call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x)


def decoder_layers(model: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, qkv: list[Stacked],
                   gate_up: list[Stacked], attend: Attend, *, norm: Norm = _module_norm,
                   linear: Linear = _call) -> torch.Tensor:
    """``h [b, n, hidden]`` (the embedded new tokens) through every decoder layer of ``model``; ``cos``/``sin``
    ``[b or 1, n, head_dim]`` are the new tokens' rotary tables. ``norm`` and ``linear`` default to calling the
    model's modules (the static decoder passes its own: norm weights cast once, an fp32 head's input cast)."""
    d = Dims.of(model.config)
    b, n, _ = h.shape
    for i, layer in enumerate(model.model.layers):
        q, k, v = project(qkv[i], norm(h, layer.input_layernorm), linear)
        q = q.reshape(b, n, d.heads, d.head_dim).transpose(1, 2)
        k = k.reshape(b, n, d.kv_heads, d.head_dim).transpose(1, 2)
        v = v.reshape(b, n, d.kv_heads, d.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        h = h + linear(layer.self_attn.o_proj, attend(i, q, k, v))
        gate, up = project(gate_up[i], norm(h, layer.post_attention_layernorm), linear)
        h = h + linear(layer.mlp.down_proj, layer.mlp.act_fn(gate) * up)
    return h
