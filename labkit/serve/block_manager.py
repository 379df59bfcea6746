"""The paged KV cache's bookkeeping: fixed-size blocks, a free list, reference counts, prefix caching.

KV memory is cut into ``num_blocks`` blocks of ``block_size`` token slots. A sequence owns a *block table*
(logical block i → physical block id), so its KV need not be contiguous and no request reserves memory for
tokens it has not produced yet: waste is at most one partly filled block per sequence.

* **Reference counts** let sequences share blocks: a forked sequence (parallel sampling) shares its parent's
  blocks; before writing into a shared block it gets its own copy (**copy-on-write**).
* **Prefix caching**: a *full* block is identified by a hash chained over every token up to its end, so equal
  hashes mean equal prefixes. A block's hash is published only after its KV has been written
  (:meth:`mark_computed`), a hit is confirmed by comparing the tokens, and the block holding a prompt's last
  token is never taken from the cache — that token must be run to produce the first output's logits.
* Freed blocks keep their hash until reused, so a later request with the same prefix can still hit them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from labkit import LabkitError
from labkit.serve.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = field(default_factory=tuple)


def chain_hash(prev_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Hash of a full block given the hash of the block before it (so it identifies the whole prefix)."""
    return hash((prev_hash, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        if num_blocks < 1:
            raise LabkitError(f"num_blocks={num_blocks} must be at least 1")
        if block_size < 1:
            raise LabkitError(f"block_size={block_size} must be at least 1")
        self.block_size, self.enable_prefix_caching = block_size, enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.prefix_hits = 0

    # ------------------------------------------------------------------ queries
    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    @property
    def num_used(self) -> int:
        return len(self.blocks) - len(self.free_ids)

    def _cacheable_blocks(self, seq: Sequence) -> int:
        """Full prompt blocks that may come from the cache: never the one holding the last prompt token."""
        return (seq.num_prompt_tokens - 1) // self.block_size if self.enable_prefix_caching else 0

    def _lookup(self, seq: Sequence) -> list[int]:
        """Physical ids of the leading prompt blocks already in the cache (confirmed token by token)."""
        hits, h = [], None
        for i in range(self._cacheable_blocks(seq)):
            tokens = tuple(seq.block_tokens(i))
            h = chain_hash(h, tokens)
            bid = self.hash_to_block.get(h)
            if bid is None or self.blocks[bid].token_ids != tokens:
                break
            hits.append(bid)
        return hits

    def _blocks_for(self, seq: Sequence, reserve_tokens: int | None) -> int:
        tokens = max(len(seq), reserve_tokens or 0)
        return -(-tokens // self.block_size)

    def can_allocate(self, seq: Sequence, reserve_tokens: int | None = None) -> bool:
        """Whether :meth:`allocate` would succeed now."""
        hits = self._lookup(seq)
        reclaimed = sum(1 for b in hits if self.blocks[b].ref_count == 0)  # hits sitting on the free list
        return self._blocks_for(seq, reserve_tokens) - len(hits) <= self.num_free - reclaimed

    # ------------------------------------------------------------------ allocation
    def _take_free(self) -> Block:
        if not self.free_ids:
            raise LabkitError("out of KV blocks (call can_allocate / can_append first)")
        block = self.blocks[self.free_ids.popleft()]
        if block.hash is not None and self.hash_to_block.get(block.hash) == block.block_id:
            del self.hash_to_block[block.hash]  # its old contents are about to be overwritten
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block

    def allocate(self, seq: Sequence, reserve_tokens: int | None = None) -> None:
        """Give a waiting sequence blocks for all its tokens, reusing cached prefix blocks.

        ``reserve_tokens`` reserves room for that many tokens up front (contiguous, unpaged serving).
        """
        if seq.block_table:
            raise LabkitError(f"sequence {seq.seq_id} already has blocks")
        if not self.can_allocate(seq, reserve_tokens):
            raise LabkitError("out of KV blocks (call can_allocate first)")
        hits = self._lookup(seq)
        for bid in hits:
            block = self.blocks[bid]
            if block.ref_count == 0:
                self.free_ids.remove(bid)
            block.ref_count += 1
            seq.block_table.append(bid)
        self.prefix_hits += len(hits)
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size
        while len(seq.block_table) < self._blocks_for(seq, reserve_tokens):
            seq.block_table.append(self._take_free().block_id)

    def mark_computed(self, seq: Sequence, num_computed_tokens: int) -> None:
        """Record that KV for the first ``num_computed_tokens`` is written; publish newly full blocks' hashes."""
        seq.num_computed_tokens = num_computed_tokens
        if not self.enable_prefix_caching:
            return
        h = None
        for i in range(min(num_computed_tokens, len(seq)) // self.block_size):
            tokens = tuple(seq.block_tokens(i))
            h = chain_hash(h, tokens)
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                block.hash, block.token_ids = h, tokens
                self.hash_to_block.setdefault(h, block.block_id)

    def can_append(self, seq: Sequence) -> bool:
        """Whether the sequence's next token has a slot (a new block is needed at a block boundary,
        or a private copy when the last block is shared)."""
        needs_block = len(seq) > len(seq.block_table) * self.block_size
        shared_last = bool(seq.block_table) and self.blocks[seq.block_table[-1]].ref_count > 1 and not needs_block
        return self.num_free >= int(needs_block or shared_last)

    def append_slot(self, seq: Sequence) -> tuple[int, int] | None:
        """Make room for the token just appended to ``seq``. Returns ``(src, dst)`` when a shared block was
        copied on write (the runner must copy its KV), else None."""
        if len(seq) > len(seq.block_table) * self.block_size:
            seq.block_table.append(self._take_free().block_id)
            return None
        last = self.blocks[seq.block_table[-1]]
        if last.ref_count > 1:
            new = self._take_free()
            last.ref_count -= 1
            seq.block_table[-1] = new.block_id
            return last.block_id, new.block_id
        return None

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Share all of ``parent``'s blocks with ``child`` (parallel sampling); writes then copy on write."""
        for bid in parent.block_table:
            self.blocks[bid].ref_count += 1
        child.block_table = list(parent.block_table)
        child.num_computed_tokens = parent.num_computed_tokens

    def free(self, seq: Sequence) -> None:
        """Release a sequence's blocks (finished or preempted). Blocks whose count reaches 0 return to the
        free list, most recently used last, keeping their hash for future prefix hits."""
        for bid in reversed(seq.block_table):
            block = self.blocks[bid]
            if block.ref_count <= 0:
                raise LabkitError(f"block {bid} freed more often than it was taken")
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_ids.append(bid)
        seq.block_table = []
        seq.num_computed_tokens = seq.num_cached_tokens = 0

    def slot(self, seq: Sequence, position: int) -> int:
        """Flat KV-cache slot of token ``position`` of ``seq``: ``block_id * block_size + offset``."""
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def check_invariants(self, live: list[Sequence]) -> None:
        """Reference counts equal the number of live block tables holding each block; free ⇔ count 0."""
        counts = [0] * len(self.blocks)
        for s in live:
            for bid in s.block_table:
                counts[bid] += 1
        free = set(self.free_ids)
        assert len(free) == len(self.free_ids), "a block is on the free list twice"
        for b in self.blocks:
            assert b.ref_count == counts[b.block_id], f"block {b.block_id}: ref {b.ref_count} != {counts[b.block_id]}"
            assert (b.ref_count == 0) == (b.block_id in free), f"block {b.block_id} free-list mismatch"
