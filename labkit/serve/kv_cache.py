"""Per-layer K/V storage for the paged cache: one flat tensor of slots per layer, indexed by slot mapping.

Slot ``block_id * block_size + offset`` holds one token's keys and values for all KV heads. The block
manager decides which slots a sequence owns; this module only stores and gathers. :class:`Int8KVCache` stores the
same slots as int8 with one scale per token and head (``kv_cache_dtype="int8"``): a quarter of fp32's bytes (half of
bf16's) plus the scales, so the same memory holds about four (two) times the tokens.
"""

from __future__ import annotations

import torch

from labkit.quant.primitives import quantize_symmetric


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (num_blocks * block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.block_size = block_size

    @classmethod
    def of_tensors(cls, k: torch.Tensor, v: torch.Tensor, block_size: int) -> KVCache:
        """A one-layer cache over existing ``[num_slots, kv_heads, head_dim]`` tensors (no copy)."""
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.block_size = [k], [v], block_size
        return cache

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``/``v`` ``[T, kv_heads, head_dim]`` at ``slots`` ``[T]``."""
        self.k[layer][slots] = k
        self.v[layer][slots] = v

    def gather(self, layer: int, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of whole blocks: ``block_ids [..., nb]`` → ``[..., nb * block_size, kv_heads, head_dim]``.

        Gathering blocks (not single slots) copies ``block_size`` contiguous tokens per index.
        """
        return _by_block(self.k[layer], block_ids, self.block_size), _by_block(
            self.v[layer], block_ids, self.block_size
        )

    def copy_block(self, src: int, dst: int) -> None:
        """Copy-on-write: duplicate a block's KV in every layer."""
        s, d, b = src * self.block_size, dst * self.block_size, self.block_size
        for t in self._stored():
            t[d:d + b] = t[s:s + b]

    def _stored(self) -> list[torch.Tensor]:
        """Every tensor that holds a slot's state (one row per slot)."""
        return [*self.k, *self.v]

    @property
    def nbytes(self) -> int:
        """Bytes the pool holds, every layer."""
        return sum(t.numel() * t.element_size() for t in self._stored())


class Int8KVCache(KVCache):
    """The same pool in int8: each token's keys (and values) of one head share one absmax scale, kept in
    ``scale_dtype``; ``gather`` returns them dequantized in ``dtype``, the model's, so attention is unchanged."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, scale_dtype: torch.dtype = torch.float16) -> None:
        super().__init__(num_layers, num_blocks, block_size, num_kv_heads, head_dim, torch.int8, device)
        scales = (num_blocks * block_size, num_kv_heads, 1)
        self.k_scale = [torch.ones(scales, dtype=scale_dtype, device=device) for _ in range(num_layers)]
        self.v_scale = [torch.ones(scales, dtype=scale_dtype, device=device) for _ in range(num_layers)]
        self.dtype = dtype

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        for codes, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            q, s = quantize_symmetric(x, 8, dim=-1, scale_dtype=scales[layer].dtype)  # absmax per token and head
            codes[layer][slots] = q
            scales[layer][slots] = s.to(scales[layer].dtype)

    def gather(self, layer: int, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = super().gather(layer, block_ids)
        ks, vs = (_by_block(t[layer], block_ids, self.block_size) for t in (self.k_scale, self.v_scale))
        return (k.to(self.dtype) * ks.to(self.dtype)), (v.to(self.dtype) * vs.to(self.dtype))

    def _stored(self) -> list[torch.Tensor]:
        return [*self.k, *self.v, *self.k_scale, *self.v_scale]


def _by_block(t: torch.Tensor, block_ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """Rows of ``t [num_slots, ...]`` for whole blocks: ``block_ids [..., nb]`` → ``[..., nb * block_size, ...]``."""
    rows = t.view(-1, block_size * t[0].numel())  # one row per block
    picked = torch.index_select(rows, 0, block_ids.reshape(-1))  # faster than t[idx] on CPU
    return picked.view(*block_ids.shape[:-1], -1, *t.shape[1:])


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, bytes_per_value: int = 2) -> int:
    """KV-cache bytes one token occupies: keys and values, every layer, every KV head."""
    return 2 * num_layers * num_kv_heads * head_dim * bytes_per_value
