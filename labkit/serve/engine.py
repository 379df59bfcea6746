"""The engine loop and the vLLM-shaped ``LLM`` API.

``LLMEngine.step()`` = schedule → run the model on the flattened batch → append sampled tokens → finish
what is done and free its blocks. ``LLM.generate`` feeds it prompts and steps until all are finished,
with a progress bar showing live output tokens/s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from labkit import LabkitError
from labkit.serve.block_manager import BlockManager
from labkit.serve.config import EngineConfig
from labkit.serve.kv_cache import KVCache
from labkit.serve.model import PagedLlama
from labkit.serve.runner import ModelRunner
from labkit.serve.sampling import SamplingParams
from labkit.serve.scheduler import Scheduler
from labkit.serve.sequence import Sequence


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS) | "length"
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    token_times: list[float] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot_s(self) -> float | None:
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)


@dataclass
class EngineStats:
    steps: int = 0
    preemptions: int = 0
    peak_blocks: int = 0
    prefix_hit_blocks: int = 0
    waste_slots: int = 0  # summed over steps: reserved slots not holding a token
    reserved_slots: int = 0
    history: list[dict] = field(default_factory=list)  # per-step snapshots when recording

    @property
    def kv_waste_pct(self) -> float:
        return 100.0 * self.waste_slots / self.reserved_slots if self.reserved_slots else 0.0


class LLMEngine:
    def __init__(self, hf_model: torch.nn.Module, tokenizer: Any, config: EngineConfig | None = None,
                 record_history: bool = False) -> None:
        self.config = config or EngineConfig()
        self.tokenizer = tokenizer
        self.model = PagedLlama(hf_model)
        cfg = self.config
        self.bm = BlockManager(cfg.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.kv = KVCache(self.model.num_layers, cfg.num_blocks, cfg.block_size, self.model.num_kv_heads,
                          self.model.head_dim, self.model.dtype, self.model.device)
        self.scheduler = Scheduler(cfg, self.bm)
        self.runner = ModelRunner(self.model, self.kv, self.bm)
        self.eos_token_id = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else \
            hf_model.config.eos_token_id
        self.stats = EngineStats()
        self.record_history = record_history
        self.requests: dict[int, tuple[Sequence, SamplingParams, RequestOutput]] = {}
        self.generators: dict[int, torch.Generator | None] = {}

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        if not prompt_token_ids:
            raise LabkitError("prompt is empty; give at least one token")
        if len(prompt_token_ids) >= self.config.max_model_len:
            raise LabkitError(f"prompt has {len(prompt_token_ids)} tokens; max_model_len is "
                              f"{self.config.max_model_len} (prompt + output must fit)")
        if params.n != 1:
            raise LabkitError(f"n={params.n}: parallel sampling is not supported by this engine yet; use n=1")
        seq = Sequence(list(prompt_token_ids), self.config.block_size)
        out = RequestOutput(seq.seq_id, list(prompt_token_ids), arrival_time=time.perf_counter())
        self.requests[seq.seq_id] = (seq, params, out)
        gen = None
        if params.seed is not None and not params.greedy:
            gen = torch.Generator().manual_seed(params.seed)
        self.generators[seq.seq_id] = gen
        self.scheduler.add(seq)
        return seq.seq_id

    def abort(self, request_id: int) -> None:
        if request_id in self.requests:
            seq, _, out = self.requests.pop(request_id)
            self.scheduler.abort(seq)
            out.finish_reason = out.finish_reason or "abort"

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[tuple[RequestOutput, int]]:
        """Run one engine step; returns ``(output, new_token)`` for every token produced."""
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            if self.scheduler.has_unfinished() and not self.scheduler.running:
                raise LabkitError("the KV pool cannot hold the next waiting request; raise num_blocks")
            return []
        params = {s.seq_id: self.requests[s.seq_id][1] for s, _ in sched.scheduled}
        new = self.runner.run(sched.scheduled, params, self.generators, sched.copies)
        now = time.perf_counter()
        for seq, n in sched.scheduled:
            self.bm.mark_computed(seq, seq.num_computed_tokens + n)
        self._account(sched)
        events = []
        for seq, _ in sched.scheduled:
            if seq.seq_id not in new:
                continue
            token = new[seq.seq_id]
            _, p, out = self.requests[seq.seq_id]
            seq.append(token)
            out.token_ids.append(token)
            out.token_times.append(now)
            out.first_token_time = out.first_token_time or now
            events.append((out, token))
            if not p.ignore_eos and token == self.eos_token_id:
                out.finish_reason = "stop"
            elif len(out.token_ids) >= p.max_tokens or len(seq) >= self.config.max_model_len:
                out.finish_reason = "length"
            if out.finished:
                out.finish_time = now
                self.scheduler.finish(seq)
                del self.requests[seq.seq_id]
                self.generators.pop(seq.seq_id, None)
        return events

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
        st.preemptions = self.scheduler.num_preemptions
        st.prefix_hit_blocks = self.bm.prefix_hits
        st.peak_blocks = max(st.peak_blocks, self.bm.num_used)
        owners, fill = self._block_fill()
        st.reserved_slots += len(owners) * self.bm.block_size
        st.waste_slots += len(owners) * self.bm.block_size - sum(fill.values())
        if self.record_history:
            st.history.append(self.snapshot(sched, owners, fill))

    def snapshot(self, sched=None, owners: dict | None = None, fill: dict | None = None) -> dict:
        """The block pool right now: owner(s) of every block, free blocks, the running batch."""
        if owners is None or fill is None:
            owners, fill = self._block_fill()
        return {"step": self.stats.steps, "owners": owners, "fill": fill, "num_blocks": len(self.bm.blocks),
                "block_size": self.bm.block_size, "running": [s.seq_id for s in self.scheduler.running],
                "waiting": [s.seq_id for s in self.scheduler.waiting],
                "scheduled": [(s.seq_id, n) for s, n in (sched.scheduled if sched else [])],
                "preemptions": self.scheduler.num_preemptions}


class LLM:
    """vLLM-shaped entry point: ``LLM("smollm2-135m").generate(prompts, SamplingParams(...))``."""

    def __init__(self, model: str | torch.nn.Module = "smollm2-135m", tokenizer: Any = None, *,
                 block_size: int = 16, num_blocks: int | None = None, max_num_seqs: int = 32,
                 max_num_batched_tokens: int = 512, max_model_len: int = 1024,
                 enable_prefix_caching: bool = False, enable_chunked_prefill: bool = True, paged: bool = True,
                 device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                 record_history: bool = False) -> None:
        from labkit import env, zoo

        if isinstance(model, str):
            model, tokenizer = zoo.load_causal_lm(model, dtype=dtype, device=device or env.default_device(),
                                                  progress=False)
        self.tokenizer = tokenizer
        config = EngineConfig(block_size=block_size, num_blocks=num_blocks, max_num_seqs=max_num_seqs,
                              max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
                              enable_prefix_caching=enable_prefix_caching,
                              enable_chunked_prefill=enable_chunked_prefill, paged=paged)
        self.engine = LLMEngine(model, tokenizer, config, record_history=record_history)

    @property
    def stats(self) -> EngineStats:
        return self.engine.stats

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise LabkitError("text prompts need a tokenizer; pass token id lists instead")
            return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return list(prompt)

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise LabkitError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        ids = [self.engine.add_request(self._encode(p), sp) for p, sp in zip(prompts, plist)]
        outputs: dict[int, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generate", unit="req", disable=not use_tqdm)
        n_tokens, t0 = 0, time.perf_counter()
        while self.engine.has_unfinished():
            for out, _ in self.engine.step():
                n_tokens += 1
                if out.finished:
                    outputs[out.request_id] = out
                    bar.update(1)
            bar.set_postfix(out_tok_s=f"{n_tokens / max(time.perf_counter() - t0, 1e-9):.1f}")
        bar.close()
        result = [outputs[i] for i in ids]
        if self.tokenizer is not None:
            for o in result:
                o.text = self.tokenizer.decode(o.token_ids, skip_special_tokens=True)
        return result
