"""A draft model inside the paged engine: speculative decoding with a small model proposing for the whole batch.

The draft keeps its own KV pool, the same number of blocks of the same size, and uses the target's **block tables**:
token ``p`` of a sequence has its draft K/V in the same slot as its target K/V, only in the other pool. So the block
manager, prefix sharing and copy-on-write need nothing new; each copy the scheduler orders is made in both pools.

Each step, after the scheduler has granted a sequence ``m`` guess slots (blocks for them included):

1. the draft catches up on the sequence's tokens it has not seen (after admission or preemption: the whole context),
   in one flat batch with every other drafting sequence, and its last logits give guess 1;
2. ``m - 1`` more single-token draft steps give guesses 2..m (their K/V lands in the granted slots);
3. the target verifies them (:func:`labkit.serve.sampling.verify_batch`), and the draft's K/V stays valid only up to
   what the target kept (:meth:`DraftProposer.settle`).

The draft proposes greedily: a deterministic proposal, so the one-hot rejection rule keeps a sampling request's
distribution exactly the target's (a draft that sampled from its own ``q`` would keep more guesses at temperature > 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from labkit import LabkitError
from labkit.serve.block_manager import BlockManager
from labkit.serve.kv_cache import KVCache
from labkit.serve.model import PagedLlama
from labkit.serve.runner import ModelRunner
from labkit.serve.scheduler import SchedulerOutput
from labkit.serve.sequence import Sequence


@dataclass
class _DraftView:
    """A sequence as the draft sees it: the target's tokens and block table, plus the guesses made so far."""

    seq_id: int
    token_ids: list[int]
    block_table: list[int]
    num_computed_tokens: int  # positions whose draft K/V is written
    guesses: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.token_ids)


class DraftProposer:
    def __init__(self, hf_draft: torch.nn.Module, target: PagedLlama, cache: type[KVCache], bm: BlockManager,
                 decode_group: int, max_model_len: int | None = None) -> None:
        self.model = PagedLlama(hf_draft, max_model_len=max_model_len)
        if self.model.vocab_size != target.vocab_size:
            raise LabkitError(f"the draft model's vocab_size={self.model.vocab_size} differs from the target's "
                             f"{target.vocab_size}: a draft must share the target's tokenizer")
        self.kv = cache(self.model.num_layers, len(bm.blocks), bm.block_size, self.model.num_kv_heads,
                        self.model.head_dim, self.model.dtype, self.model.device)
        self.runner = ModelRunner(self.model, self.kv, bm, decode_group)
        self.seen: dict[int, int] = {}  # seq id -> positions with valid draft K/V
        self.forwards = 0  # draft forward passes (the cost side of the acceptance rate)

    def fill(self, sched: SchedulerOutput) -> None:
        """Make this step's copy-on-write copies in the draft pool and replace the scheduler's placeholder guesses
        (their number is what it granted) by the draft's own."""
        for src, dst in sched.copies:
            self.kv.copy_block(src, dst)
        running = {s.seq_id for s, _ in sched.scheduled}
        self.seen = {k: v for k, v in self.seen.items() if k in running}  # finished, aborted or preempted: forgotten
        views = [_DraftView(s.seq_id, list(s.token_ids), s.block_table, self.seen.get(s.seq_id, 0))
                 for s, _ in sched.scheduled if sched.drafts.get(s.seq_id)]
        want = {v.seq_id: len(sched.drafts[v.seq_id]) for v in views}
        while views:
            batch = [(v, len(v) - v.num_computed_tokens) for v in views]
            batch_out, sampled = self.runner.prepare(batch)
            logits = self.model(batch_out, self.kv)
            self.forwards += 1
            best = torch.argmax(logits, dim=-1).tolist()  # one transfer for the whole batch
            for v, tok in zip(sampled, best):
                v.num_computed_tokens = len(v)
                v.guesses.append(tok)
                v.token_ids.append(tok)
            views = [v for v in views if len(v.guesses) < want[v.seq_id]]
            for v in sampled:
                if len(v.guesses) == want[v.seq_id]:
                    sched.drafts[v.seq_id] = v.guesses
                    self.seen[v.seq_id] = v.num_computed_tokens  # the last guess has no draft K/V

    def forget(self, seq_id: int) -> None:
        """The request ended: its draft K/V goes with its blocks."""
        self.seen.pop(seq_id, None)

    def settle(self, seq: Sequence) -> None:
        """After verification: the draft's K/V past what the target kept belongs to rejected guesses."""
        if seq.seq_id in self.seen:
            self.seen[seq.seq_id] = min(self.seen[seq.seq_id], seq.num_computed_tokens)
