"""FCFS continuous batching with a token budget, chunked prefill and preemption by recompute.

Every step the scheduler fills a budget of ``max_num_batched_tokens`` tokens and ``max_num_seqs`` sequences:

1. **Running sequences first**, oldest first: one token each when decoding, or the next chunk of a prompt.
   If the block pool cannot hold a sequence's next tokens, the *newest* running sequence is preempted —
   all its blocks are freed and it goes back to the front of the waiting queue, to be recomputed later.
2. **Then waiting sequences**, first come first served, while blocks, tokens and sequence slots last
   (never after a preemption in the same step). A prompt longer than the remaining budget is *chunked*.

With speculative decoding, a decoding sequence may bring ``k`` guessed tokens (``drafts``): it is scheduled for
``1 + k`` tokens when the budget and the pool allow, else for its one token without guesses (guesses never cause a
preemption).

A request is never lost: it is always in exactly one of waiting, running or finished.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from labkit.serve.block_manager import BlockManager
from labkit.serve.config import EngineConfig
from labkit.serve.sequence import Sequence, Status


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens to compute)
    preempted: list[Sequence] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write block copies for the runner
    drafts: dict[int, list[int]] = field(default_factory=dict)  # seq id -> guessed tokens scheduled after its last

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.config, self.bm = config, block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence that already holds blocks (a forked parallel sample) joins the running batch."""
        seq.status = Status.RUNNING
        self.running.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def reserve_tokens(self, seq: Sequence) -> int | None:
        """Tokens to reserve at admission: none when paged; else ``max_model_len``, or exactly
        prompt + ``max_tokens`` under ``kv_reservation="exact"``."""
        if self.config.paged:
            return None
        if self.config.kv_reservation == "exact" and seq.max_tokens is not None:
            return min(seq.num_prompt_tokens + seq.max_tokens, self.config.max_model_len)
        return self.config.max_model_len

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free(seq)
        seq.status = Status.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self, drafts: dict[int, list[int]] | None = None) -> SchedulerOutput:
        """This step's batch. ``drafts``: guessed next tokens of decoding sequences (speculative decoding)."""
        out = SchedulerOutput()
        drafts = drafts or {}
        # blocks no running sequence needs for its own next token: only these may hold guesses
        spare = self.bm.num_free - sum(self.bm.append_cost(s) for s in self.running) if drafts else 0
        budget = self.config.max_num_batched_tokens
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = min(len(seq) - seq.num_computed_tokens, budget)
            guess = drafts.get(seq.seq_id, [])[:budget - 1] if n == 1 else []
            extra = self.bm.append_cost(seq, len(guess)) - self.bm.append_cost(seq) if guess else 0
            if extra > spare:
                guess, extra = [], 0
            spare -= extra
            while not self.bm.can_append(seq):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            copy = self.bm.append_slot(seq, len(guess))
            if copy:
                out.copies.append(copy)
            if guess:
                out.drafts[seq.seq_id] = guess
                n += len(guess)
            out.scheduled.append((seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            contiguous, reserve = not self.config.paged, self.reserve_tokens(seq)
            if not self.bm.can_allocate(seq, reserve, contiguous):
                break
            if not self.config.enable_chunked_prefill and len(seq) - self.bm.cached_tokens(seq) > budget:
                break  # checked before allocating: no blocks taken and given back
            self.bm.allocate(seq, reserve, contiguous)
            remaining = len(seq) - seq.num_computed_tokens
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(remaining, budget)
            out.scheduled.append((seq, n))
            budget -= n
        return out

    def finish(self, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        self.running.remove(seq)
        self.bm.free(seq)

    def abort(self, seq: Sequence) -> None:
        """Drop a request wherever it is (client went away); its blocks return to the pool."""
        if seq in self.running:
            self.finish(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
            seq.status = Status.FINISHED
