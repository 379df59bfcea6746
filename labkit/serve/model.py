"""A Llama forward pass over a *flattened* batch with attention over the paged KV cache.

The layer loop is the kit's one Llama forward (:func:`labkit.llama.decoder_layers`, which the static decoder runs
too); only attention is this module's: each layer writes the new tokens' K/V to their slots, then every sequence
attends over the slots its block table names. q/k/v and gate/up are stacked into one matmul each
(``EngineConfig.stack_projections``; 1.01-1.08x on serving's quick workload, tokens identical). Plain PyTorch, CPU
or CUDA.

The batch mixes prefill chunks (many query tokens of one sequence) and decode tokens (one query token per
sequence). Decode tokens are attended in padded groups of similar length; each prefill chunk on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from labkit.llama import Dims, check_supported, decoder_layers, stacked_projections
from labkit.serve.kv_cache import KVCache


@dataclass
class Batch:
    """Everything one forward step needs, built by the runner."""

    input_ids: torch.Tensor  # [T] tokens whose KV is not yet in the cache
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] where each token's K/V goes
    prefills: list[tuple[int, int, torch.Tensor, int]]  # (flat start, n tokens, context blocks [nb], first position)
    # decode tokens in groups of similar context length (less padding): (flat rows [b, n] (n > 1 when verifying
    # speculated tokens), block tables [b, nb_max] padded with block 0, mask [b, n, nb_max * block_size] True where
    # a context token the row may see is)
    decodes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    logits_rows: torch.Tensor  # [N] flat rows whose next-token logits are wanted


def group_mask(mask: torch.Tensor, groups: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[b, n, L]`` → ``[b, 1, groups*n, L]``: the mask for query heads folded into the query length. With
    ``dtype``, as the additive mask SDPA would otherwise make from the boolean one at every call (0 or -inf)."""
    mask = mask.repeat(1, groups, 1).unsqueeze(1)
    if dtype is None:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, groups: int,
            scale: float) -> torch.Tensor:
    """Grouped-query attention without copying K/V per head.

    q ``[b, heads, n, d]``, k/v ``[b, L, kv_heads, d]``, mask ``[b, n, L]`` (True = attend) → ``[b, n, heads*d]``.
    The ``groups`` query heads sharing one KV head are folded into the query length, so K/V are used as is.
    """
    b, heads, n, d = q.shape
    kv_heads = heads // groups
    qg = q.reshape(b, kv_heads, groups * n, d)
    if mask.dim() == 3:
        mask = group_mask(mask, groups)
    out = F.scaled_dot_product_attention(qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)
    return out.reshape(b, heads, n, d).transpose(1, 2).reshape(b, n, heads * d)


class PagedLlama(nn.Module):
    def __init__(self, hf_model: nn.Module, fuse: bool = True, max_model_len: int | None = None,
                 prepack: bool = False) -> None:
        super().__init__()
        cfg = hf_model.config
        check_supported(cfg, "the paged engine", max_model_len, "max_model_len")
        self.hf = hf_model
        self.num_layers = cfg.num_hidden_layers
        dims = Dims.of(cfg)
        self.num_heads, self.num_kv_heads, self.head_dim = dims.heads, dims.kv_heads, dims.head_dim
        self.scale = self.head_dim**-0.5
        self.vocab_size = cfg.vocab_size
        # q/k/v and gate/up stacked into one matmul each (a copy of those weights, held as long as the engine lives)
        self.qkv, self.gate_up = stacked_projections(hf_model, fuse)
        self.linear = None  # the layer loop's linear hook: tensor parallelism all-reduces o and down through it
        self.packer = None
        if prepack:  # the fast path (labkit.prepack): the same products, weights laid out once for oneDNN
            from labkit import prepack as P

            P.check(self.device, self.dtype)
            self.packer = P.Packer()
            self.packer.pack_model(hf_model, self.qkv, self.gate_up)  # the model itself is left as it is
            self.linear = self.packer.linear

    @property
    def dtype(self) -> torch.dtype:
        return self.hf.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.hf.model.embed_tokens.weight.device

    @staticmethod
    def _causal(n: int, pos0: int, length: int, device: torch.device) -> torch.Tensor:
        """``[1, n, length]``: query ``i`` of a chunk starting at position ``pos0`` sees context slots
        ``<= pos0 + i``."""
        return (torch.arange(length, device=device)[None, :] <= (pos0 + torch.arange(n, device=device))[:, None])[None]

    @torch.no_grad()
    def forward(self, batch: Batch, kv: KVCache) -> torch.Tensor:
        """Logits ``[N, vocab]`` for ``batch.logits_rows``; writes the batch's K/V into ``kv``."""
        m = self.hf.model
        h = m.embed_tokens(batch.input_ids).unsqueeze(0)  # [1, T, hidden]
        cos, sin = m.rotary_emb(h, batch.positions.unsqueeze(0))

        T = batch.input_ids.shape[0]
        groups = self.num_heads // self.num_kv_heads
        # masks built once per step, shared by every layer: a prefill chunk's query i sees context up to pos0 + i
        # (slots past the context are masked out by the same causality)
        prefills = [(start, n, blocks, group_mask(self._causal(n, pos0, blocks.numel() * kv.block_size, h.device),
                                                  groups, h.dtype)) for start, n, blocks, pos0 in batch.prefills]
        decodes = [(rows, blocks, group_mask(mask, groups, h.dtype)) for rows, blocks, mask in batch.decodes]

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kv.write(i, batch.slot_mapping, k[0].transpose(0, 1), v[0].transpose(0, 1))
            out = torch.empty(T, self.num_heads * self.head_dim, dtype=h.dtype, device=h.device)
            q = q[0]  # [heads, T, d]
            for start, n, blocks, mask in prefills:
                ck, cv = kv.gather(i, blocks)
                out[start:start + n] = _attend(q[:, start:start + n][None], ck[None], cv[None], mask, groups,
                                               self.scale)[0]
            for rows, blocks, mask in decodes:
                ck, cv = kv.gather(i, blocks)
                out[rows] = _attend(q[:, rows].transpose(0, 1), ck, cv, mask, groups, self.scale)
            return out.unsqueeze(0)

        h = decoder_layers(self.hf, h, cos, sin, self.qkv, self.gate_up, attend,
                           **({"linear": self.linear} if self.linear is not None else {}))
        h = m.norm(h[0, batch.logits_rows])
        head = self.packer.linear(self.hf.lm_head, h) if self.packer is not None else self.hf.lm_head(h)
        return head.float()
