"""The paged KV cache's bookkeeping: fixed-size blocks, a free list, reference counts, prefix caching.

KV memory is cut into ``num_blocks`` blocks of ``block_size`` token slots. A sequence owns a *block table*
(logical block i → physical block id), so its KV need not be contiguous and no request reserves memory for
tokens it has not produced yet: waste is at most one partly filled block per sequence.

* **Reference counts** let sequences share blocks: a forked sequence (parallel sampling) shares its parent's
  blocks; before writing into a shared block it gets its own copy (**copy-on-write**).
* **Prefix caching**: a *full* block is identified by a SHA-256 hash chained over (parent hash, block tokens),
  so equal hashes mean equal prefixes (Python's ``hash()`` is cheap to collide on purpose, a known attack on
  serving engines that share a cache between users). Each sequence hashes a block once, when it fills. A
  block's hash is published only after its KV has been written (:meth:`mark_computed`), a hit is confirmed by
  comparing the tokens, and the block holding a sequence's last token is never taken from the cache — that
  token must be run to produce the next logits. Generated tokens count too, so a preempted sequence finds
  its own blocks again.
* Freed blocks keep their hash until reused, so a later request with the same prefix can still hit them.
* **Speculative decoding** writes K/V for guessed tokens past the sequence's end: :meth:`append_slot` takes
  ``lookahead`` slots for them and :meth:`trim` gives back the blocks that held only rejected guesses.
* **Contiguous mode** (``contiguous=True`` in :meth:`allocate`): the baseline without paging. A sequence
  takes one run of consecutive blocks for everything it reserves, so the pool also suffers *external*
  fragmentation: free blocks scattered in holes too small for the next request.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from labkit import LabkitError
from labkit.serve.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None
    token_ids: tuple[int, ...] = field(default_factory=tuple)


def chain_hash(prev_hash: bytes | None, token_ids: tuple[int, ...] | list[int]) -> bytes:
    """SHA-256 of a full block given the hash of the block before it (so it identifies the whole prefix)."""
    h = hashlib.sha256(prev_hash or b"")
    h.update(b"".join(t.to_bytes(4, "little") for t in token_ids))
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        if num_blocks < 1:
            raise LabkitError(f"num_blocks={num_blocks} must be at least 1")
        if block_size < 1:
            raise LabkitError(f"block_size={block_size} must be at least 1")
        self.block_size, self.enable_prefix_caching = block_size, enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.hash_to_block: dict[bytes, int] = {}  # SHA-256 of a full block (chained) -> block id
        self.prefix_hits = 0  # blocks taken from the prefix cache
        self.prefix_queried_tokens = self.prefix_hit_tokens = 0  # vLLM's prefix-cache counters, in tokens

    # ------------------------------------------------------------------ queries
    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    @property
    def num_used(self) -> int:
        return len(self.blocks) - len(self.free_ids)

    def block_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Hashes of the first ``num_blocks`` full blocks of ``seq``, extending its cached list incrementally."""
        hashes = seq.block_hashes
        for i in range(len(hashes), num_blocks):
            hashes.append(chain_hash(hashes[-1] if hashes else None, seq.block_tokens(i)))
        return hashes[:num_blocks]

    def _lookup(self, seq: Sequence) -> list[int]:
        """Physical ids of the leading full blocks already in the cache (confirmed token by token); never the
        block holding the last token."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        for i, h in enumerate(self.block_hashes(seq, (len(seq) - 1) // self.block_size)):
            bid = self.hash_to_block.get(h)
            if bid is None or self.blocks[bid].token_ids != tuple(seq.block_tokens(i)):
                break
            hits.append(bid)
        return hits

    def cached_tokens(self, seq: Sequence) -> int:
        """Tokens of a waiting ``seq`` whose KV :meth:`allocate` would take from the prefix cache."""
        return len(self._lookup(seq)) * self.block_size

    def _blocks_for(self, seq: Sequence, reserve_tokens: int | None) -> int:
        tokens = max(len(seq), reserve_tokens or 0)
        return -(-tokens // self.block_size)

    def _free_run(self, length: int) -> int | None:
        """First block id starting ``length`` consecutive free blocks (first fit), or None."""
        free = set(self.free_ids)
        run = 0
        for bid in range(len(self.blocks)):
            run = run + 1 if bid in free else 0
            if run == length:
                return bid - length + 1
        return None

    def can_allocate(self, seq: Sequence, reserve_tokens: int | None = None, contiguous: bool = False) -> bool:
        """Whether :meth:`allocate` would succeed now."""
        if contiguous:
            return self._free_run(self._blocks_for(seq, reserve_tokens)) is not None
        hits = self._lookup(seq)
        reclaimed = sum(1 for b in hits if self.blocks[b].ref_count == 0)  # hits sitting on the free list
        return self._blocks_for(seq, reserve_tokens) - len(hits) <= self.num_free - reclaimed

    def stranded_free(self, seq: Sequence, reserve_tokens: int | None = None) -> int:
        """External fragmentation for a contiguous request: the free blocks, when there are enough of them in
        total but no run of consecutive ones is long enough; else 0."""
        need = self._blocks_for(seq, reserve_tokens)
        return self.num_free if self.num_free >= need and self._free_run(need) is None else 0

    # ------------------------------------------------------------------ allocation
    def _take_free(self) -> Block:
        if not self.free_ids:
            raise LabkitError("out of KV blocks (call can_allocate / can_append first)")
        return self._claim(self.blocks[self.free_ids.popleft()])

    def _claim(self, block: Block) -> Block:
        if block.hash is not None and self.hash_to_block.get(block.hash) == block.block_id:
            del self.hash_to_block[block.hash]  # its old contents are about to be overwritten
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block

    def allocate(self, seq: Sequence, reserve_tokens: int | None = None, contiguous: bool = False) -> None:
        """Give a waiting sequence blocks for all its tokens, reusing cached prefix blocks.

        ``reserve_tokens`` reserves room for that many tokens up front; ``contiguous=True`` takes them as one
        run of consecutive blocks (the unpaged baselines; no prefix caching).
        """
        if seq.block_table:
            raise LabkitError(f"sequence {seq.seq_id} already has blocks")
        if contiguous:
            self._allocate_run(seq, self._blocks_for(seq, reserve_tokens))
            return
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
        if self.enable_prefix_caching:
            self.prefix_queried_tokens += len(seq)
            self.prefix_hit_tokens += len(hits) * self.block_size
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size
        while len(seq.block_table) < self._blocks_for(seq, reserve_tokens):
            seq.block_table.append(self._take_free().block_id)

    def _allocate_run(self, seq: Sequence, length: int) -> None:
        """Contiguous allocation: the first run of ``length`` consecutive free blocks."""
        if self.enable_prefix_caching:
            raise LabkitError("contiguous allocation does not share blocks; switch prefix caching off")
        start = self._free_run(length)
        if start is None:
            raise LabkitError("out of KV blocks (call can_allocate first)")
        self.free_ids = deque(b for b in self.free_ids if not start <= b < start + length)
        for bid in range(start, start + length):
            self._claim(self.blocks[bid])
            seq.block_table.append(bid)

    def mark_computed(self, seq: Sequence, num_computed_tokens: int) -> None:
        """Record that KV for the first ``num_computed_tokens`` is written; publish newly full blocks' hashes."""
        seq.num_computed_tokens = num_computed_tokens
        if not self.enable_prefix_caching:
            return
        full = min(num_computed_tokens, len(seq)) // self.block_size
        for i, h in enumerate(self.block_hashes(seq, full)):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                block.hash, block.token_ids = h, tuple(seq.block_tokens(i))
                self.hash_to_block.setdefault(h, block.block_id)

    def _shared_first_write(self, seq: Sequence) -> int | None:
        """Index in the block table of the block taking this step's first write (the last known token's), when
        another sequence shares it (it must be copied before the write); None otherwise."""
        first = (len(seq) - 1) // self.block_size
        shared = first < len(seq.block_table) and self.blocks[seq.block_table[first]].ref_count > 1
        return first if shared else None

    def append_cost(self, seq: Sequence, lookahead: int = 0) -> int:
        """Free blocks :meth:`append_slot` needs: new blocks up to ``len(seq) + lookahead`` tokens, plus a private
        copy when the block taking this step's first write is shared."""
        new = max(0, -(-(len(seq) + lookahead) // self.block_size) - len(seq.block_table))
        return new + int(self._shared_first_write(seq) is not None)

    def can_append(self, seq: Sequence, lookahead: int = 0) -> bool:
        """Whether the sequence's next token (and ``lookahead`` speculated ones after it) have slots: a new block
        at a block boundary, or a private copy when the block written first is shared."""
        return self.num_free >= self.append_cost(seq, lookahead)

    def append_slot(self, seq: Sequence, lookahead: int = 0) -> tuple[int, int] | None:
        """Make room for the token just appended to ``seq`` and ``lookahead`` speculated tokens after it. Returns
        ``(src, dst)`` when a shared block was copied on write (the runner must copy its KV), else None."""
        copy = None
        first = self._shared_first_write(seq)
        if first is not None:
            old, new = self.blocks[seq.block_table[first]], self._take_free()
            old.ref_count -= 1
            seq.block_table[first] = new.block_id
            copy = old.block_id, new.block_id
        while len(seq.block_table) * self.block_size < len(seq) + lookahead:
            seq.block_table.append(self._take_free().block_id)
        return copy

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """KV rollback after speculation: give back the blocks past the first ``num_tokens`` tokens (they held only
        rejected guesses, so they are private and unhashed)."""
        keep = -(-num_tokens // self.block_size)
        self._release(seq.block_table[keep:])
        del seq.block_table[keep:]

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Share all of ``parent``'s blocks with ``child`` (parallel sampling); writes then copy on write."""
        for bid in parent.block_table:
            self.blocks[bid].ref_count += 1
        child.block_table = list(parent.block_table)
        child.num_computed_tokens = parent.num_computed_tokens

    def free(self, seq: Sequence) -> None:
        """Release a sequence's blocks (finished or preempted). Blocks whose count reaches 0 return to the
        free list, most recently used last, keeping their hash for future prefix hits."""
        self._release(reversed(seq.block_table))
        seq.block_table = []
        seq.num_computed_tokens = seq.num_cached_tokens = 0

    def _release(self, block_ids: Iterable[int]) -> None:
        """Drop one reference to each block; a block nobody holds goes to the end of the free list."""
        for bid in block_ids:
            block = self.blocks[bid]
            if block.ref_count <= 0:
                raise LabkitError(f"block {bid} freed more often than it was taken")
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_ids.append(bid)

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
        if len(free) != len(self.free_ids):
            raise RuntimeError("a block is on the free list twice")
        for b in self.blocks:
            if b.ref_count != counts[b.block_id]:
                raise RuntimeError(f"block {b.block_id}: ref count {b.ref_count} != {counts[b.block_id]} holders")
            if (b.ref_count == 0) != (b.block_id in free):
                raise RuntimeError(f"block {b.block_id}: free-list mismatch (ref count {b.ref_count})")
