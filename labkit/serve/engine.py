"""The engine loop: ``LLMEngine.step()`` = (guess next tokens by prompt lookup or a draft model, when speculating)
→ schedule → run the model on the flattened batch → append sampled (or kept) tokens → finish what is done and free
its blocks. The user-facing API is :class:`labkit.serve.LLM` (``llm.py``); what a request returns is in
``outputs.py``."""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from typing import Any

import torch

from labkit import LabkitError
from labkit.serve.block_manager import BlockManager
from labkit.serve.config import EngineConfig
from labkit.serve.drafter import DraftProposer
from labkit.serve.kv_cache import Int8KVCache, KVCache
from labkit.serve.model import PagedLlama
from labkit.serve.outputs import EngineStats, RequestOutput
from labkit.serve.runner import ModelRunner
from labkit.serve.sampling import SamplingParams
from labkit.serve.scheduler import Scheduler
from labkit.serve.sequence import Sequence, Status
from labkit.serve.speculative import ngram_propose


class LLMEngine:
    def __init__(self, hf_model: torch.nn.Module, tokenizer: Any, config: EngineConfig | None = None,
                 record_history: bool = False) -> None:
        self.config = config or EngineConfig()
        self.tokenizer = tokenizer
        self.tp = None
        if self.config.tensor_parallel_size > 1:  # rank 0's shard here; the other ranks in their own processes
            from labkit.serve.tensor_parallel import TensorParallel

            self.tp = TensorParallel(hf_model, self.config.tensor_parallel_size, self.config)
            hf_model = self.tp.part
        self.model = PagedLlama(hf_model, fuse=self.config.stack_projections, max_model_len=self.config.max_model_len,
                                prepack=self.config.prepack_weights)
        cfg = self.config
        self.bm = BlockManager(cfg.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        cache = Int8KVCache if cfg.kv_cache_dtype == "int8" else KVCache
        self.kv = cache(self.model.num_layers, cfg.num_blocks, cfg.block_size, self.model.num_kv_heads,
                          self.model.head_dim, self.model.dtype, self.model.device)
        if self.tp is not None:
            self.model, self.kv = self.tp.wrap(self.model, self.kv)
        self.scheduler = Scheduler(cfg, self.bm)
        self.runner = ModelRunner(self.model, self.kv, self.bm, cfg.decode_group)
        self.spec = cfg.speculative()
        self.drafter = DraftProposer(self.spec.model, self.model, cache, self.bm, cfg.decode_group,
                                      cfg.max_model_len) \
            if self.spec and self.spec.method == "draft_model" else None
        self.eos_token_id = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else \
            hf_model.config.eos_token_id
        self.stats = EngineStats()
        self._preemptions_before = 0  # the scheduler's count when the stats were last reset
        self.record_history = record_history
        self.requests: dict[int, tuple[Sequence, SamplingParams, RequestOutput]] = {}
        self.generators: dict[int, torch.Generator | None] = {}
        self.pending_forks: dict[int, int] = {}  # parent seq id -> samples still to fork (n > 1)

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (a no-op otherwise; safe to call twice)."""
        if self.tp is not None:
            self.tp.close()

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise if the request can never run (reads only the config, so any thread may call it)."""
        if not prompt_token_ids:
            raise LabkitError("prompt is empty; give at least one token")
        if len(prompt_token_ids) >= self.config.max_model_len:
            raise LabkitError(f"prompt has {len(prompt_token_ids)} tokens; max_model_len is "
                              f"{self.config.max_model_len} (prompt + output must fit)")

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        self.check_request(prompt_token_ids, params)
        seq = Sequence(list(prompt_token_ids), self.config.block_size, max_tokens=params.max_tokens)
        out = RequestOutput(seq.seq_id, list(prompt_token_ids), arrival_time=time.perf_counter())
        self._register(seq, params, out)
        if params.n > 1:
            out.samples = [out]
            self.pending_forks[seq.seq_id] = params.n - 1
        self.scheduler.add(seq)
        return seq.seq_id

    def _register(self, seq: Sequence, params: SamplingParams, out: RequestOutput) -> None:
        self.requests[seq.seq_id] = (seq, params, out)
        gen = None
        if params.seed is not None and not params.greedy:
            gen = torch.Generator().manual_seed(params.seed)
        self.generators[seq.seq_id] = gen

    def _fork_samples(self, parent: Sequence) -> None:
        """Parallel sampling (``n > 1``): once the parent's prompt is in the cache, each extra sample shares all
        its blocks (``BlockManager.fork``), re-runs only the last prompt token for its own logits, and copies a
        shared block the first time it writes into it (copy-on-write). Sample ``i`` uses seed ``seed + i``."""
        _, params, parent_out = self.requests[parent.seq_id]
        prompt = parent.token_ids[:parent.num_prompt_tokens]
        for i in range(1, self.pending_forks.pop(parent.seq_id) + 1):
            child = Sequence(list(prompt), self.config.block_size, max_tokens=params.max_tokens)
            self.bm.fork(parent, child)
            child.num_computed_tokens = len(prompt) - 1  # the last prompt token runs again: this sample's logits
            child_params = dataclasses.replace(params, n=1, seed=None if params.seed is None else params.seed + i)
            out = RequestOutput(child.seq_id, list(prompt), arrival_time=parent_out.arrival_time)
            self._register(child, child_params, out)
            parent_out.samples.append(out)
            self.scheduler.add_running(child)

    def abort(self, request_id: int, reason: str = "abort") -> RequestOutput | None:
        """Drop a request wherever it is; its blocks return to the pool. Returns its output, if it was live."""
        self.generators.pop(request_id, None)
        self.pending_forks.pop(request_id, None)
        if self.drafter:
            self.drafter.forget(request_id)
        if request_id not in self.requests:
            return None
        seq, _, out = self.requests.pop(request_id)
        for sample in out.samples[1:]:  # parallel samples go with their request
            self.abort(sample.request_id, reason)
        self.scheduler.abort(seq)
        self.stats.close_trace(seq.seq_id)
        out.finish_reason = out.finish_reason or reason
        out.finish_time = out.finish_time or time.perf_counter()
        return out

    def abort_running(self, reason: str = "error") -> list[RequestOutput]:
        """Abort every request in the running batch (after a failed step, whose state cannot be trusted)."""
        return [out for s in list(self.scheduler.running) if (out := self.abort(s.seq_id, reason)) is not None]

    def abort_waiting_head(self, reason: str = "error") -> RequestOutput | None:
        """Abort the request at the head of the waiting queue (one nothing can hold, after a failed step)."""
        waiting = self.scheduler.waiting
        return self.abort(waiting[0].seq_id, reason) if waiting else None

    def state(self) -> dict[str, int]:
        """The engine's state for monitoring, in one read (what a server's /metrics publishes)."""
        return {
            "num_requests_running": len(self.scheduler.running),
            "num_requests_waiting": len(self.scheduler.waiting),
            "kv_blocks_used": self.bm.num_used,
            "kv_blocks_total": len(self.bm.blocks),
            "spec_draft_tokens_total": self.stats.spec_proposed,  # speculative decoding: guessed
            "spec_accepted_tokens_total": self.stats.spec_accepted,  # ... and kept
            "prefix_cache_queries_total": self.bm.prefix_queried_tokens,  # prompt tokens looked up in the cache
            "prefix_cache_hits_total": self.bm.prefix_hit_tokens,  # ... and found there
        }

    def reset_stats(self) -> None:
        """Fresh counters (steps, waste, preemptions) before a repeated run; the scheduler is not touched."""
        self.stats = EngineStats()
        self._preemptions_before = self.scheduler.num_preemptions

    def check_consistent(self) -> None:
        """Raise if block reference counts disagree with the live block tables (a leak or a double free)."""
        self.bm.check_invariants(list(self.scheduler.running) + list(self.scheduler.waiting))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def _propose(self) -> dict[int, list[int]]:
        """Guesses for every running sequence about to decode, never past its ``max_tokens`` or ``max_model_len``
        (``k`` guesses can add ``k + 1`` tokens): prompt lookup's, or with a draft model ``k`` placeholders that
        :meth:`DraftProposer.fill` replaces once the scheduler has granted their slots."""
        spec, drafts = self.spec, {}
        for seq in self.scheduler.running:
            if len(seq) - seq.num_computed_tokens != 1 or seq.seq_id in self.pending_forks:
                continue
            _, p, out = self.requests[seq.seq_id]
            k = min(spec.num_speculative_tokens, p.max_tokens - len(out.token_ids) - 1,
                    self.config.max_model_len - len(seq) - 1)
            if k <= 0:
                continue
            guess = [0] * k if self.drafter else ngram_propose(seq.token_ids, k, spec.prompt_lookup_max,
                                                                 spec.prompt_lookup_min)
            if guess:
                drafts[seq.seq_id] = guess
        return drafts

    def step(self) -> list[tuple[RequestOutput, int]]:
        """Run one engine step — schedule → run → postprocess — and return ``(output, new_token)`` for every token
        produced (with speculative decoding a request can produce several in one step; its finish reason belongs
        to its last one)."""
        sched = self._schedule()
        if not sched.scheduled:
            if self.scheduler.has_unfinished() and not self.scheduler.running:
                raise LabkitError("the KV pool cannot hold the next waiting request; raise num_blocks")
            return []
        params = {s.seq_id: self.requests[s.seq_id][1] for s, _ in sched.scheduled}
        new = self.runner.run(sched.scheduled, params, self.generators, sched.copies, sched.drafts,
                              self.stats.phase_s)
        with self._phase("update"):
            return self._postprocess(sched, new)

    @contextmanager
    def _phase(self, name: str):
        """Add the block's wall time to ``stats.phase_s[name]`` (one of :data:`STEP_PHASES`)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stats.phase_s[name] += time.perf_counter() - t0

    def _schedule(self):
        """The scheduler's decision, with speculative guesses where speculation is on (a draft model fills its
        guesses once the scheduler has granted their slots)."""
        if not self.spec:
            with self._phase("schedule"):
                return self.scheduler.schedule(None)
        with self._phase("propose"):
            drafts = self._propose()
        with self._phase("schedule"):
            sched = self.scheduler.schedule(drafts)
        if self.drafter:
            with self._phase("propose"):
                self.drafter.fill(sched)  # the draft model's forward passes
        return sched

    def _postprocess(self, sched, new: dict[int, list[int]]) -> list[tuple[RequestOutput, int]]:
        """Mark the KV that is now valid, count the step, and append each request's new tokens."""
        now = time.perf_counter()
        for seq, n in sched.scheduled:
            guess = sched.drafts.get(seq.seq_id)
            # KV is valid for what ran, less the rejected guesses (the kept ones join the sequence below)
            self.bm.mark_computed(seq, seq.num_computed_tokens + (len(new[seq.seq_id]) if guess else n))
            if guess:
                self.stats.spec_proposed += len(guess)
                self.stats.spec_accepted += len(new[seq.seq_id]) - 1
        self._account(sched)
        events = []
        for seq, _ in sched.scheduled:
            for token in new.get(seq.seq_id, []):
                events.append(self._emit(seq, token, now))
                if seq.status is Status.FINISHED:  # a stop among the kept guesses: the rest is not wanted
                    break
            else:
                if seq.seq_id in sched.drafts:
                    self._settle_guesses(seq)
        return events

    def _settle_guesses(self, seq: Sequence) -> None:
        """After verification: hash the blocks the kept guesses filled, free blocks that held only rejected
        ones (KV rollback), and let the draft model catch up."""
        self.bm.mark_computed(seq, seq.num_computed_tokens)
        if self.config.paged:
            self.bm.trim(seq, len(seq))
        if self.drafter:
            self.drafter.settle(seq)

    def _emit(self, seq: Sequence, token: int, now: float) -> tuple[RequestOutput, int]:
        """Append one new token to its request; finish the request at EOS or its length limit."""
        _, p, out = self.requests[seq.seq_id]
        seq.append(token)
        out.token_ids.append(token)
        out.token_times.append(now)
        out.first_token_time = out.first_token_time or now
        if seq.seq_id in self.pending_forks:
            self._fork_samples(seq)
        if not p.ignore_eos and token == self.eos_token_id:
            out.finish_reason = "stop"
        elif len(out.token_ids) >= p.max_tokens or len(seq) >= self.config.max_model_len:
            out.finish_reason = "length"
        if out.finished:
            out.finish_time = now
            self.scheduler.finish(seq)
            self.stats.close_trace(seq.seq_id)
            del self.requests[seq.seq_id]
            self.generators.pop(seq.seq_id, None)
            if self.drafter:
                self.drafter.forget(seq.seq_id)
        return out, token

    def _block_fill(self) -> tuple[dict[int, list[int]], dict[int, int]]:
        """Owners of every used block and how many of its slots hold a token's KV (shared blocks once)."""
        owners: dict[int, list[int]] = {}
        fill: dict[int, int] = {}
        bs = self.bm.block_size
        for s in self.scheduler.running:
            for i, bid in enumerate(s.block_table):
                owners.setdefault(bid, []).append(s.seq_id)
                fill[bid] = max(fill.get(bid, 0), min(bs, max(0, s.num_computed_tokens - i * bs)))
        return owners, fill

    def _account(self, sched) -> None:
        st = self.stats
        st.steps += 1
        st.preemptions = self.scheduler.num_preemptions - self._preemptions_before
        st.prefix_hit_blocks = self.bm.prefix_hits
        st.peak_blocks = max(st.peak_blocks, self.bm.num_used)
        st.max_running = max(st.max_running, len(self.scheduler.running))
        if not self.record_history:  # telemetry below walks every block table: only when asked
            return
        st.recorded = True
        owners, fill = self._block_fill()
        bs = self.bm.block_size
        st.reserved_slots += len(owners) * bs
        st.waste_slots += len(owners) * bs - sum(fill.values())
        st.pool_slot_steps += len(self.bm.blocks) * bs
        for s in self.scheduler.running:
            held = len(s.block_table) * bs
            st.open_traces.setdefault(s.seq_id, []).append((held, min(held, s.num_computed_tokens)))
        if self.scheduler.waiting and not self.config.paged:
            head = self.scheduler.waiting[0]
            st.external_slot_steps += self.bm.stranded_free(head, self.scheduler.reserve_tokens(head)) * bs
        st.history.append(self.snapshot(sched, owners, fill))

    def snapshot(self, sched=None, owners: dict | None = None, fill: dict | None = None) -> dict:
        """The block pool right now: owner(s) of every block, free blocks, the running batch."""
        if owners is None or fill is None:
            owners, fill = self._block_fill()
        return {"step": self.stats.steps, "owners": owners, "fill": fill, "num_blocks": len(self.bm.blocks),
                "block_size": self.bm.block_size, "running": [s.seq_id for s in self.scheduler.running],
                "waiting": [s.seq_id for s in self.scheduler.waiting],
                "scheduled": [(s.seq_id, n) for s, n in (sched.scheduled if sched else [])],
                "block_tables": {s.seq_id: list(s.block_table) for s in self.scheduler.running},
                "preemptions": self.scheduler.num_preemptions - self._preemptions_before,
                "prefix_hit_blocks": self.bm.prefix_hits}
