"""Notebook 06: the block manager's append_slot and paged attention, checked against the engine's own
code (``BlockManager``, ``KVCache.gather`` + ``_attend``)."""

from __future__ import annotations

import copy
import math
from collections import deque
from collections.abc import Callable

import torch

from labkit.exercises._check import Mismatch, close, each, gen

NOTEBOOK = "06a"


def _slot(block_table: list[int], block_size: int, t: int) -> int:
    """Flat KV-cache slot of token ``t``: its physical block times the block size, plus its offset in the block."""
    return block_table[t // block_size] * block_size + t % block_size


def kit_append_slot(block_table: list[int], num_tokens: int, free_blocks: list[int], ref_counts: dict[int, int],
                    block_size: int) -> tuple[int, tuple[int, int] | None]:
    """Make room for a sequence's token number ``num_tokens`` (0-based) and return ``(slot, copy)``: the flat
    KV slot it is written to, and ``(src, dst)`` when its last block was shared and had to be copied first
    (copy-on-write), else None. New blocks come from the front of ``free_blocks``; ``block_table``,
    ``free_blocks`` and ``ref_counts`` (block id → sequences holding it) are updated in place.

    This is the engine's own code: :meth:`BlockManager.append_slot`, then :meth:`BlockManager.slot`."""
    from labkit.serve.block_manager import BlockManager
    from labkit.serve.sequence import Sequence

    bm = BlockManager(max([*block_table, *free_blocks, *ref_counts], default=0) + 1, block_size)
    bm.free_ids = deque(free_blocks)
    for b in bm.blocks:
        b.ref_count = ref_counts.get(b.block_id, 0)
    seq = Sequence([0] * (num_tokens + 1), block_size, block_table=list(block_table))
    copy = bm.append_slot(seq)
    block_table[:], free_blocks[:] = seq.block_table, list(bm.free_ids)
    ref_counts.clear()
    ref_counts.update({b.block_id: b.ref_count for b in bm.blocks if b.ref_count})
    return bm.slot(seq, num_tokens), copy


def kit_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: list[int],
                        block_size: int, context_len: int) -> torch.Tensor:
    """One decode query ``q [heads, d]`` attending over the first ``context_len`` tokens of a sequence whose
    K/V live in ``k_cache``/``v_cache`` ``[num_slots, kv_heads, d]`` at the slots its block table names.
    ``kv_heads`` may divide ``heads`` (grouped-query attention: query head h reads KV head h // (heads //
    kv_heads)). This is the engine's own code path: :meth:`KVCache.gather` of whole blocks, then
    ``serve.model._attend`` with the slots past the context masked out."""
    from labkit.serve.kv_cache import KVCache
    from labkit.serve.model import _attend

    heads, d = q.shape
    groups = heads // k_cache.shape[1]
    blocks = torch.tensor(block_table[:math.ceil(context_len / block_size)], device=q.device)
    ck, cv = KVCache.of_tensors(k_cache, v_cache, block_size).gather(0, blocks[None])  # [1, nb * B, kv_heads, d]
    mask = (torch.arange(ck.shape[1], device=q.device) < context_len)[None, None]  # [1, 1, L]
    out = _attend(q[None, :, None], ck, cv, mask, groups, 1 / math.sqrt(d))  # [1, 1, heads * d]
    return out.view(heads, d)


def _append_cases() -> list[tuple[str, dict]]:
    g = gen(4)
    cases = [
        ("inside the last block: no new block", dict(block_table=[7], num_tokens=2, free_blocks=[3, 5],
                                                     ref_counts={7: 1}, block_size=4)),
        ("at a block boundary: take the first free block", dict(block_table=[7], num_tokens=4, free_blocks=[3, 5],
                                                                ref_counts={7: 1}, block_size=4)),
        ("the first token of an empty table", dict(block_table=[], num_tokens=0, free_blocks=[9, 2],
                                                   ref_counts={}, block_size=16)),
        ("block_size 1: every token a block", dict(block_table=[4, 1], num_tokens=2, free_blocks=[0],
                                                   ref_counts={4: 1, 1: 1}, block_size=1)),
        ("the last block is shared: copy it on write", dict(block_table=[2, 6], num_tokens=6, free_blocks=[8, 9],
                                                            ref_counts={2: 2, 6: 2}, block_size=4)),
        ("shared blocks, but the last is full: a fresh block, no copy",
         dict(block_table=[2, 6], num_tokens=8, free_blocks=[8], ref_counts={2: 2, 6: 2}, block_size=4)),
    ]
    free = torch.randperm(12, generator=g).tolist()
    table: list[int] = []
    refs: dict[int, int] = {}
    for t in range(10):  # a sequence growing token by token from nothing, block size 3
        cases.append((f"a sequence growing to {t + 1} tokens", dict(block_table=list(table), num_tokens=t,
                                                                    free_blocks=list(free), ref_counts=dict(refs),
                                                                    block_size=3)))
        kit_append_slot(table, t, free, refs, 3)
    return cases


def _check_append_slot(fn: Callable) -> str:
    for what, case in each(_append_cases()):
        mine, kit = copy.deepcopy(case), copy.deepcopy(case)
        args = ("block_table", "num_tokens", "free_blocks", "ref_counts", "block_size")
        got, want = fn(*(mine[a] for a in args)), kit_append_slot(**kit)
        state = ", ".join(f"{k}={v}" for k, v in case.items())
        if not (isinstance(got, tuple) and len(got) == 2):
            raise Mismatch(f"{what}: return (slot, copy) — copy is (src, dst) or None; you returned {got!r}")
        for label, a, b in (("copy", got[1], want[1]),
                            ("block_table afterwards", mine["block_table"], kit["block_table"]),
                            ("slot", got[0], want[0]),
                            ("free_blocks afterwards", mine["free_blocks"], kit["free_blocks"]),
                            ("ref_counts afterwards", {k: v for k, v in mine["ref_counts"].items() if v},
                             kit["ref_counts"])):
            if a != b:
                hint = {"slot": " (block_table[t // block_size] · block_size + t % block_size, after any new "
                                "block)",
                        "copy": " (a shared last block — ref count > 1 — is copied to a fresh block before the "
                                "write; a full last block needs a new block instead, no copy)"}.get(label, "")
                raise Mismatch(f"{what} ({state}): your {label} is {a!r}, the kit's {b!r}{hint}")
    return ("a new block exactly at block boundaries, copy-on-write for a shared last block, and the slot "
            "the token's K/V go to — what BlockManager.append_slot does every decode step")


def _check_paged_attention(fn: Callable) -> str:
    g = gen(5)
    d = 8
    # (heads, kv_heads, block_size, context_len): SmolLM2, the served model, has 9 query heads and 3 KV heads
    for heads, kv_heads, block_size, context_len in ((4, 4, 4, 11), (4, 4, 16, 16), (4, 4, 1, 5), (4, 4, 8, 1),
                                                     (9, 3, 4, 10), (6, 2, 16, 20)):
        n_blocks = math.ceil(context_len / block_size)
        table = torch.randperm(12, generator=g)[:n_blocks].tolist()
        k_cache = torch.randn(12 * block_size, kv_heads, d, generator=g)
        v_cache = torch.randn(12 * block_size, kv_heads, d, generator=g)
        q = torch.randn(heads, d, generator=g)
        # The same K/V laid out contiguously, one copy per query head: what paging must reproduce.
        kv_of = torch.arange(heads) // (heads // kv_heads)
        k = torch.stack([k_cache[_slot(table, block_size, t)] for t in range(context_len)])[:, kv_of]
        v = torch.stack([v_cache[_slot(table, block_size, t)] for t in range(context_len)])[:, kv_of]
        want = torch.softmax((q.unsqueeze(1) * k.transpose(0, 1)).sum(-1) / math.sqrt(d), -1)
        want = (want.unsqueeze(-1) * v.transpose(0, 1)).sum(1)
        where = f"heads={heads}, kv_heads={kv_heads}, block_size={block_size}, context_len={context_len}"
        try:
            got = fn(q, k_cache, v_cache, table, block_size, context_len)
        except (RuntimeError, IndexError) as exc:  # shapes that only fit one KV head per query head
            if kv_heads == heads:
                raise
            raise Mismatch(f"{where}: your function raised {exc} — grouped-query attention: {heads} query heads "
                           f"share {kv_heads} KV heads, query head h reads KV head h // {heads // kv_heads}") from None
        hint = (f" (grouped-query attention: query head h reads KV head h // {heads // kv_heads}, not h % "
                f"{kv_heads})" if kv_heads < heads else "")
        close(got, want, f"{where}: the attention output{hint}", atol=1e-4)
    return ("attention over the gathered pages equals attention over contiguous K/V (partial last block and "
            "grouped-query heads included), as the engine computes it")


# name: (the kit's function, its checker)
EXERCISES = {"append_slot": (kit_append_slot, _check_append_slot),
             "paged_attention": (kit_paged_attention, _check_paged_attention)}
