"""Per-layer K/V storage for the paged cache: one flat tensor of slots per layer, indexed by slot mapping.

Slot ``block_id * block_size + offset`` holds one token's keys and values for all KV heads. The block
manager decides which slots a sequence owns; this module only stores and gathers.
"""

from __future__ import annotations

import torch


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
        def by_block(t: torch.Tensor) -> torch.Tensor:
            rows = t.view(-1, self.block_size * t.shape[1] * t.shape[2])  # one row per block
            picked = torch.index_select(rows, 0, block_ids.reshape(-1))  # faster than t[idx] on CPU
            return picked.view(*block_ids.shape[:-1], -1, *t.shape[1:])

        return by_block(self.k[layer]), by_block(self.v[layer])

    def copy_block(self, src: int, dst: int) -> None:
        """Copy-on-write: duplicate a block's KV in every layer."""
        s, d, b = src * self.block_size, dst * self.block_size, self.block_size
        for k, v in zip(self.k, self.v):
            k[d:d + b] = k[s:s + b]
            v[d:d + b] = v[s:s + b]


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, bytes_per_value: int = 2) -> int:
    """KV-cache bytes one token occupies: keys and values, every layer, every KV head."""
    return 2 * num_layers * num_kv_heads * head_dim * bytes_per_value
