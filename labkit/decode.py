"""A lean greedy decoder for Llama-shaped models: a static KV cache and the kit's one Llama layer loop
(:func:`labkit.llama.decoder_layers`, which the paged engine runs too).

Hugging Face's ``generate`` pays, every token, for generality a batch-1 decode step does not need: a dynamic cache
object, mask construction, hooks and ~160 aten calls per layer (most of them views) around its seven matmuls
(notebook 01's breakdown measures it). On a small model on a CPU that overhead is as large as the matmuls, so
it hides what
quantization saves. :class:`StaticDecoder` runs the same weights — every projection is still the model's own module,
so quantized layers (labkit's fused kernels, bitsandbytes) run unchanged — with only what a decode step needs:

- the KV cache is preallocated once, ``[batch, kv_heads, max_len, head_dim]`` per layer, and written in place;
- rotary cos/sin come from the model's own rotary module, computed once for every position;
- RMSNorm is one ``F.rms_norm``; attention is one ``scaled_dot_product_attention`` with grouped-query heads;
- q/k/v and gate/up are stacked into one matmul each (:func:`labkit.stacking.concat_rows`; ``fuse=False`` keeps
  seven calls a layer): four kernel calls a layer instead of seven. The decoder holds its own stacked copy (5/7
  of each layer's weight bytes, for as long as it lives); the model is not changed;
- each projection is called through the plainest form it has, found once: a quantized or prepacked layer's
  ``direct`` function (its kernel with the constants bound, no module call and no checks per call; at batch 1 those
  cost 9 of the 50 µs SmolLM2's int4 down projection takes on the 2-core Xeon), else the module;
- ``dtype`` sets the activations' dtype. ``"auto"`` (the default) is the dtype the projections compute in
  (:func:`labkit.measure.compute_dtype`): the weights' dtype, or bf16 for labkit's fused int8/int4 kernels, so
  no projection casts its input and output every call. The decoder cannot choose the weights' dtype: load the model
  with ``dtype="auto"`` for bf16 where it is native. Plain ``nn.Linear`` weights in another dtype (an fp32 output
  head) get their input cast.

``prepack=True`` is the fast path: the float linears laid out once in oneDNN's blocked format (:mod:`labkit.prepack`),
the same products without a reorder on every call.

Its greedy tokens equal HF's (tests/test_decode.py); it is a measuring tool for decode speed, not a server (that is
``labkit.serve``). Supported: the decoder layers of Llama, Mistral (without a sliding window) and Qwen2.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from labkit import LabkitError, env, measure
from labkit.llama import Dims, check_supported, decoder_layers, stacked_projections


class StaticDecoder:
    """Prefill a prompt, then greedy decode steps, on a preallocated cache of ``max_len`` positions."""

    def __init__(self, model: nn.Module, batch: int = 1, max_len: int = 512, dtype: torch.dtype | str | None = "auto",
                 fuse: bool = True, prepack: bool = False) -> None:
        cfg = model.config
        check_supported(cfg, "StaticDecoder", max_len, "max_len")
        if batch < 1 or max_len < 2:
            raise LabkitError(f"batch={batch} and max_len={max_len} must be at least 1 and 2")
        self.model, self.batch, self.max_len = model, batch, max_len
        dims = Dims.of(cfg)
        self.heads, self.kv_heads, self.head_dim = dims.heads, dims.kv_heads, dims.head_dim
        self.eps = cfg.rms_norm_eps
        emb = model.model.embed_tokens.weight
        auto = dtype is None or dtype == "auto"
        self.dtype = measure.compute_dtype(model) if auto else env.resolve_dtype(dtype)
        self.device = emb.device
        self.norms = {id(mod): mod.weight.detach().to(self.dtype) for mod in model.modules()
                      if type(mod).__name__.endswith("RMSNorm")}
        shape = (batch, self.kv_heads, max_len, self.head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in model.model.layers]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in model.model.layers]
        positions = torch.arange(max_len, device=self.device)[None]
        with torch.no_grad():
            cos, sin = model.model.rotary_emb(emb[:1][None].float(), positions)
        self.cos, self.sin = cos[0].to(self.dtype), sin[0].to(self.dtype)  # [max_len, head_dim]
        self.pos = 0
        self.qkv, self.gate_up = stacked_projections(model, fuse)
        self.fused_groups = sum(len(g) == 1 for g in self.qkv + self.gate_up)  # how many stacks became one matmul
        self.packer = None
        self.calls: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}  # id(module) -> its function (_call)
        if prepack:  # the fast path (labkit.prepack): the float linears laid out once for oneDNN; model untouched
            from labkit import prepack as P

            P.check(self.device, self.dtype)
            self.packer = P.Packer()
            self.packer.pack_model(model, self.qkv, self.gate_up)

    def _norm(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        w = self.norms[id(norm)]
        return F.rms_norm(x, w.shape, w, getattr(norm, "variance_epsilon", self.eps))

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, every: bool = False) -> torch.Tensor:
        """Run ``ids [batch, n]`` at the next ``n`` positions; returns the last position's logits ``[batch, vocab]``,
        or with ``every`` each position's, ``[batch, n, vocab]`` (speculative decoding verifies n tokens at once)."""
        b, n = ids.shape
        p0, p1 = self.pos, self.pos + n
        if b != self.batch:
            raise LabkitError(f"ids has batch {b}; this decoder was built for batch={self.batch}")
        if p1 > self.max_len:
            raise LabkitError(f"position {p1} is past max_len={self.max_len}; build the decoder with a larger max_len")
        m = self.model.model
        causal, mask = n > 1 and p0 == 0, _causal_tail(n, p0, p1, self.device)  # the same for every layer

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self.k[i][:, :, p0:p1], self.v[i][:, :, p0:p1] = k, v
            o = F.scaled_dot_product_attention(q, self.k[i][:, :, :p1], self.v[i][:, :, :p1], is_causal=causal,
                                               attn_mask=mask, enable_gqa=True)
            return o.transpose(1, 2).reshape(b, n, self.heads * self.head_dim)

        linear = self._call
        h = decoder_layers(self.model, m.embed_tokens(ids).to(self.dtype), self.cos[None, p0:p1],
                           self.sin[None, p0:p1], self.qkv, self.gate_up, attend, norm=self._norm, linear=linear)
        self.pos = p1
        return linear(self.model.lm_head, self._norm(h if every else h[:, -1], m.norm))

    def _call(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``module(x)`` through the fastest form found once per module: its packed copy, and its ``direct`` function
        where it has one (the fused kernel with its constants bound: no module call, no per-call checks)."""
        fn = self.calls.get(id(module))
        if fn is None:
            mod = self.packer.get(module) if self.packer is not None else module
            direct = getattr(mod, "direct", None)
            fn = (direct(self.dtype) if direct is not None else None) or (lambda x, mod=mod: _linear(mod, x))
            self.calls[id(module)] = fn
        return fn(x)

    def reset(self) -> None:
        """Forget the context (the cache is overwritten from position 0 by the next prefill)."""
        self.pos = 0

    def rewind(self, pos: int) -> None:
        """Keep only the first ``pos`` cached positions (rejected draft tokens are overwritten by what comes next)."""
        if not 0 <= pos <= self.pos:
            raise LabkitError(f"pos={pos} must lie in 0..{self.pos} (the positions cached now)")
        self.pos = pos

    def generate(self, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy: prefill ``ids`` and decode ``new_tokens``; returns ``[batch, new_tokens]``."""
        self.reset()
        nxt = self.forward(ids).argmax(-1, keepdim=True)
        out = [nxt]
        for _ in range(new_tokens - 1):
            nxt = self.forward(nxt).argmax(-1, keepdim=True)
            out.append(nxt)
        return torch.cat(out, dim=1)


def _linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``; a plain ``nn.Linear`` in another dtype gets ``x`` cast to its weight's dtype and back."""
    if type(module) is nn.Linear and module.weight.dtype != x.dtype:
        return F.linear(x.to(module.weight.dtype), module.weight, module.bias).to(x.dtype)
    return module(x)


def _causal_tail(n: int, p0: int, p1: int, device: torch.device) -> torch.Tensor | None:
    """The mask for ``n > 1`` new tokens after ``p0`` cached ones (chunked prefill); ``None`` where none is needed."""
    if n == 1 or p0 == 0:
        return None
    return torch.arange(p1, device=device)[None, :] <= torch.arange(p0, p1, device=device)[:, None]
