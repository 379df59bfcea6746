"""What labkit's paged engine is compared against, on the same requests.

* ``hf_sequential`` — ``model.generate`` one request at a time (also the greedy *reference* output);
* ``hf_static`` — left-padded static batches: every request in a batch waits for the longest one;
* ``hf_continuous`` — transformers' own continuous batching manager (``generate_batch``'s engine);
* the labkit engine with ``paged=False`` (contiguous max-length KV reservation) lives in ``engine``.

Each returns a :class:`Run`: the generated ids per request and per-request timings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Run:
    """Outputs and timings of one serving run over a list of requests."""

    token_ids: list[list[int]]
    wall_s: float
    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)
    notes: str = ""


class _Clock:
    """A ``generate`` streamer that timestamps every chunk (the first chunk is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _gen_kwargs(model: nn.Module, n: int) -> dict:
    return dict(max_new_tokens=n, min_new_tokens=n, do_sample=False,
                pad_token_id=model.config.pad_token_id if model.config.pad_token_id is not None else 0)


@torch.no_grad()
def hf_sequential(model: nn.Module, prompts: list[list[int]], max_tokens: list[int]) -> Run:
    """``generate`` per request, one after another; greedy, EOS ignored."""
    dev = next(model.parameters()).device
    outs, ttft, tpot = [], [], []
    t0 = time.perf_counter()
    for p, n in zip(prompts, max_tokens):
        clock = _Clock()
        start = time.perf_counter()
        ids = torch.tensor([p], device=dev)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), streamer=clock, **_gen_kwargs(model, n))
        outs.append(out[0, len(p):].tolist())
        token_times = clock.times[1:]
        ttft.append(token_times[0] - start)
        if len(token_times) > 1:
            tpot.append((token_times[-1] - token_times[0]) / (len(token_times) - 1))
    return Run(outs, time.perf_counter() - t0, ttft, tpot)


@torch.no_grad()
def hf_static(model: nn.Module, prompts: list[list[int]], max_tokens: list[int], batch_size: int) -> Run:
    """Left-padded batches of ``batch_size`` in arrival order; each batch runs to its longest output."""
    dev = next(model.parameters()).device
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    outs: list[list[int]] = []
    ttft, tpot = [], []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        ps, ns = prompts[i:i + batch_size], max_tokens[i:i + batch_size]
        width = max(len(p) for p in ps)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in ps], device=dev)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps], device=dev)
        clock = _Clock()
        out = model.generate(ids, attention_mask=mask, streamer=clock, **_gen_kwargs(model, max(ns)))
        token_times = clock.times[1:]
        for row, n in zip(out, ns):
            outs.append(row[width:width + n].tolist())
            ttft.append(token_times[0] - t0)  # every request waited from the start of the run
            if n > 1:
                tpot.append((token_times[n - 1] - token_times[0]) / (n - 1))
    return Run(outs, time.perf_counter() - t0, ttft, tpot, notes=f"batch_size={batch_size}")


@torch.no_grad()
def hf_continuous(model: nn.Module, prompts: list[list[int]], max_tokens: list[int]) -> Run:
    """transformers' continuous batching manager, each request with its own ``max_new_tokens``."""
    from transformers import GenerationConfig

    gc = GenerationConfig(do_sample=False, max_new_tokens=max(max_tokens), eos_token_id=-1,
                          pad_token_id=model.config.pad_token_id or 0)
    t0 = time.perf_counter()
    results = {}
    with model.continuous_batching_context_manager(generation_config=gc, block=True, timeout=5) as manager:
        ids = [manager.add_request(p, max_new_tokens=n, record_timestamps=True, eos_token_id=-1)
               for p, n in zip(prompts, max_tokens)]
        while len(results) < len(ids):
            r = manager.get_result(timeout=1)
            if r is not None and r.is_finished():
                results[r.request_id] = r
            elif r is None and not manager.is_running():
                raise RuntimeError("transformers' continuous batching thread stopped")
    wall = time.perf_counter() - t0
    outs, ttft, tpot = [], [], []
    for rid in ids:
        r = results[rid]
        outs.append(list(r.generated_tokens))
        ts = r.timestamps or []
        if ts:
            ttft.append(ts[0] - t0)
            if len(ts) > 1:
                tpot.append((ts[-1] - ts[0]) / (len(ts) - 1))
    return Run(outs, wall, ttft, tpot)
