"""Could decode attention read the paged KV pool in place on this CPU? A probe with FlexAttention.

    python tools/flex_decode_probe.py     (about a minute on 2 cores, most of it compiling)

The engine copies each decoding sequence's blocks out of the pool before ``scaled_dot_product_attention``
(``kv_cache.gather``). FlexAttention can attend over the whole pool as one key/value sequence and visit only the
blocks a ``BlockMask`` lists, so a block mask built from the block tables is paged attention without the copy
(every block but a sequence's last is a *full* block; the last is *partial*, cut by a ``mask_mod``). This probe
times one layer's decode attention both ways at SmolLM2's shape (9 query heads, 3 KV heads, head_dim 64, 32
sequences of 300 tokens, 16-token blocks), for blocks laid out in order and shuffled, and checks they agree. It
also times building the block mask, which an engine pays once per step.

What it found on torch 2.13 (2-core EPYC, 2026-12-04), and why the engine does not use it:

* in isolation the compiled kernel is a little faster than gather + SDPA: three runs of this probe measured
  1.0-1.2 ms against 1.3-1.7 ms a layer (and once, while compiling in the background, 2.2 against 2.1), but building
  the block mask costs 6-10 ms, once a step;
* inside the engine (tried on a branch, ``dynamic=True``, one compile per process) a step was *slower*: 2.2 ms a
  layer for the kernel against 1.7 ms for gather + SDPA, plus ~7 ms a step for the mask; greedy tokens were
  identical;
* with ``dynamic=False`` (one compile per engine shape) Inductor chose its flex-decoding template, which took 4.4
  ms a layer on the engine's real block tables, and on one shifted layout the process died with
  ``free(): invalid next size``: heap corruption, so it is not safe to ship;
* recompiling with dynamic shapes for a second block size, or for a batch of one, failed to build its C++.

Run it again on a newer torch: if the kernel is fast on real block tables and safe, it is the way to drop the copy.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16


def block_mask(tables: torch.Tensor, lengths: torch.Tensor, num_blocks: int) -> BlockMask:
    """Rows attend to the first ``lengths[i]`` tokens of block table ``tables[i]`` (all rows the same length)."""
    b, nb = tables.shape
    full = torch.zeros(b, 1, 1, num_blocks, dtype=torch.int32)
    full[:, 0, 0, :nb - 1] = tables[:, :nb - 1]
    partial = torch.zeros(b, 1, 1, num_blocks, dtype=torch.int32)
    partial[:, 0, 0, 0] = tables[:, nb - 1]
    last = (lengths - (nb - 1) * BLOCK).to(torch.int32)

    def in_length(bi, h, q, kv):
        return kv % BLOCK < last[bi]

    return BlockMask.from_kv_blocks(torch.ones(b, 1, 1, dtype=torch.int32), partial,
                                    torch.full((b, 1, 1), nb - 1, dtype=torch.int32), full,
                                    BLOCK_SIZE=(1, BLOCK), mask_mod=in_length, seq_lengths=(1, num_blocks * BLOCK))


def timed(fn, repeats: int = 30) -> float:
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1e3


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    b, ctx, num_blocks = 32, 300, 1024
    nb = -(-ctx // BLOCK)
    k_pool = torch.randn(num_blocks * BLOCK, KV_HEADS, HEAD_DIM)  # the engine's layout: [slots, kv_heads, d]
    v_pool = torch.randn_like(k_pool)
    q = torch.randn(b, HEADS, 1, HEAD_DIM)
    lengths = torch.full((b,), ctx)
    kernel = torch.compile(flex_attention, dynamic=True)
    for layout, tables in (("in order", torch.arange(b * nb).view(b, nb)),
                           ("shuffled", torch.randperm(num_blocks)[:b * nb].view(b, nb))):
        tables = tables.to(torch.int32)
        t0 = time.perf_counter()
        mask = block_mask(tables, lengths, num_blocks)
        mask_ms = 1e3 * (time.perf_counter() - t0)

        def flex(mask=mask, k=k_pool.permute(1, 0, 2)[None], v=v_pool.permute(1, 0, 2)[None]):
            return kernel(q, k, v, block_mask=mask, enable_gqa=True)

        head_major = (k_pool.permute(1, 0, 2).contiguous()[None], v_pool.permute(1, 0, 2).contiguous()[None])

        def gather(tables=tables):
            idx = tables.reshape(-1).long()
            k = k_pool.view(num_blocks, -1).index_select(0, idx).view(b, nb * BLOCK, KV_HEADS, HEAD_DIM)
            v = v_pool.view(num_blocks, -1).index_select(0, idx).view(b, nb * BLOCK, KV_HEADS, HEAD_DIM)
            keep = (torch.arange(nb * BLOCK)[None] < lengths[:, None])[:, None, None]
            return F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=keep,
                                                  enable_gqa=True)

        t0 = time.perf_counter()
        diff = (flex() - gather()).abs().max().item()
        first_ms = 1e3 * (time.perf_counter() - t0)
        hm = timed(lambda mask=mask, pools=head_major: flex(mask, *pools))
        print(f"blocks {layout}: flex {timed(flex):.2f} ms (on a head-major pool copy: {hm:.2f}), gather + SDPA "
              f"{timed(gather):.2f} ms a layer; max difference {diff:.1e}; block mask built in {mask_ms:.1f} ms; "
              f"first call (compiling) {first_ms:.0f} ms")


if __name__ == "__main__":
    main()
