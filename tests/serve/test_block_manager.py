import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from labkit import LabkitError
from labkit.serve.block_manager import BlockManager
from labkit.serve.sequence import Sequence


def seq(tokens, bs=4):
    return Sequence(list(tokens), block_size=bs)


def test_allocate_append_free_no_leak():
    bm = BlockManager(8, 4)
    s = seq(range(6))
    bm.allocate(s)
    assert len(s.block_table) == 2 and bm.num_free == 6
    for t in range(3):  # 6 -> 9 tokens: crosses into a third block at token 9
        s.append(100 + t)
        assert bm.can_append(s)
        bm.append_slot(s)
    assert len(s.block_table) == 3
    assert bm.slot(s, 8) == s.block_table[2] * 4
    bm.free(s)
    assert bm.num_free == 8
    bm.check_invariants([])


def test_prefix_hit_only_after_kv_is_written_and_never_the_last_prompt_token():
    bm = BlockManager(16, 4, enable_prefix_caching=True)
    a = seq(range(10))
    bm.allocate(a)
    b = seq(range(10))
    assert not bm._lookup(b)  # a's KV not written yet: nothing published
    bm.mark_computed(a, 10)
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.num_cached_tokens == 8
    c = seq(range(8))  # exactly two blocks: the second holds the last prompt token
    bm.allocate(c)
    assert c.num_cached_tokens == 4 and c.block_table[0] == a.block_table[0]
    assert c.block_table[1] != a.block_table[1]
    bm.check_invariants([a, b, c])


def test_hash_collision_is_confirmed_by_tokens():
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    a = seq(range(9))
    bm.allocate(a)
    bm.mark_computed(a, 9)
    bm.blocks[a.block_table[0]].token_ids = (9, 9, 9, 9)  # pretend the stored tokens differ
    b = seq(range(9))
    bm.allocate(b)
    assert b.num_cached_tokens == 0


def test_freed_blocks_stay_cached_until_reused():
    bm = BlockManager(4, 4, enable_prefix_caching=True)
    a = seq(range(9))
    bm.allocate(a)
    bm.mark_computed(a, 9)
    bm.free(a)
    b = seq(range(9))
    bm.allocate(b)
    assert b.num_cached_tokens == 8 and bm.num_free == 1
    bm.check_invariants([b])


def test_fork_shares_then_copies_on_write():
    bm = BlockManager(8, 4)
    p = seq(range(6))
    bm.allocate(p)
    c = seq(range(6))
    bm.fork(p, c)
    assert bm.blocks[p.block_table[1]].ref_count == 2
    c.append(42)
    assert bm.can_append(c)
    src, dst = bm.append_slot(c)
    assert src == p.block_table[1] and dst == c.block_table[1] != src
    assert c.block_table[0] == p.block_table[0]
    bm.check_invariants([p, c])
    bm.free(p)
    bm.free(c)
    assert bm.num_free == 8


def test_out_of_blocks_is_a_clear_error():
    bm = BlockManager(1, 4)
    with pytest.raises(LabkitError, match="out of KV blocks"):
        bm.allocate(seq(range(5)))
    with pytest.raises(LabkitError, match="num_blocks=0"):
        BlockManager(0, 4)


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / append / fork / free sequences: counts conserved at every step, no leaks at the end."""

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(24, 3, enable_prefix_caching=True)
        self.live: list[Sequence] = []

    @rule(prompt=st.lists(st.integers(0, 2), min_size=1, max_size=12))
    def add(self, prompt):
        s = seq(prompt, bs=3)
        if self.bm.can_allocate(s):
            self.bm.allocate(s)
            self.bm.mark_computed(s, len(s))
            self.live.append(s)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100), tok=st.integers(0, 2))
    def append(self, i, tok):
        s = self.live[i % len(self.live)]
        s.append(tok)
        if self.bm.can_append(s):
            self.bm.append_slot(s)
            self.bm.mark_computed(s, len(s))
        else:
            s.token_ids.pop()

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100))
    def fork(self, i):
        p = self.live[i % len(self.live)]
        c = Sequence(list(p.token_ids), block_size=3, num_prompt_tokens=p.num_prompt_tokens)
        self.bm.fork(p, c)
        self.live.append(c)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100))
    def free(self, i):
        self.bm.free(self.live.pop(i % len(self.live)))

    @invariant()
    def counts_conserved(self):
        self.bm.check_invariants(self.live)

    def teardown(self):
        for s in self.live:
            self.bm.free(s)
        assert self.bm.num_free == len(self.bm.blocks)


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_prefix_hashes_are_sha256_chained_and_computed_once():
    from labkit.serve.block_manager import chain_hash

    bm = BlockManager(16, 4, enable_prefix_caching=True)
    s = Sequence(list(range(10)), 4)
    h = bm.block_hashes(s, 2)
    assert len(h[0]) == 32 and h[1] == chain_hash(h[0], [4, 5, 6, 7])
    assert chain_hash(None, [1, 2]) != chain_hash(None, [2, 1])
    s.token_ids[0] = 99  # cached: not recomputed (a full block's tokens never change in the engine)
    assert bm.block_hashes(s, 2) == h


def test_contiguous_allocation_takes_one_run_and_suffers_external_fragmentation():
    bm = BlockManager(12, 4)
    seqs = [Sequence([1] * 4, 4) for _ in range(3)]
    for s in seqs:
        bm.allocate(s, reserve_tokens=16, contiguous=True)  # 4 blocks each, consecutive
    assert [s.block_table for s in seqs] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    bm.free(seqs[0])
    bm.free(seqs[2])
    small = Sequence([1] * 4, 4)
    bm.allocate(small, reserve_tokens=8, contiguous=True)  # 2 blocks: first fit, in the first hole
    assert small.block_table == [0, 1]
    bm.free(seqs[1])
    big = Sequence([1] * 4, 4)
    assert bm.num_free == 10
    assert bm.can_allocate(big, reserve_tokens=32, contiguous=True)  # 8 free in a row: 2..9
    bm.allocate(big, reserve_tokens=32, contiguous=True)
    assert big.block_table == list(range(2, 10))
    bm.free(small)
    late = Sequence([1] * 4, 4)
    assert bm.num_free == 4 and not bm.can_allocate(late, reserve_tokens=16, contiguous=True)  # holes 0-1, 10-11
    assert bm.can_allocate(late, reserve_tokens=16)  # a paged allocation fits in the same 4 blocks
    bm.check_invariants([big])
