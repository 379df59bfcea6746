"""What labkit's paged engine is compared against, on the same requests.

* ``hf_sequential`` — ``model.generate`` one request at a time (also the greedy *reference* output);
* ``hf_static`` — left-padded static batches: every request in a batch waits for the longest one;
* ``HFContinuous`` — transformers' own continuous batching manager (``generate_batch``'s engine), started
  before the clock, with labkit's page size and token budget;
* the labkit engine with ``paged=False`` (contiguous max-length KV reservation) lives in ``engine``.

Each returns a :class:`Run`: the generated ids per request and per-request timings.
"""

from __future__ import annotations

import copy
import dataclasses
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
    peak_memory_bytes: int | None = None  # set by the experiment (measure.track_peak_memory)


class _Clock:
    """A ``generate`` streamer that timestamps every chunk (the first chunk is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class _DropEosWarning:
    """transformers warns that EOS id -1 'will not stop' generation: exactly what ``ignore_eos`` wants."""

    LOGGERS = ("transformers.generation.utils", "transformers.generation.configuration_utils",
               "transformers.generation.logits_process")

    def filter(self, record) -> bool:
        return "eos_token_id` should consist of positive integers" not in record.getMessage()

    def __enter__(self) -> None:  # only while the kit's own generate() calls run: no global logging change
        import logging

        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self)

    def __exit__(self, *exc) -> None:
        import logging

        for name in self.LOGGERS:
            logging.getLogger(name).removeFilter(self)


def _gen_kwargs(model: nn.Module, n: int) -> dict:
    """Greedy, exactly ``n`` new tokens, EOS switched *off* (id -1 never occurs), as the engine's ``ignore_eos``
    does. (``min_new_tokens`` would instead forbid EOS, turning a greedy EOS into the runner-up token.)"""
    return dict(max_new_tokens=n, do_sample=False, eos_token_id=-1,
                pad_token_id=model.config.pad_token_id if model.config.pad_token_id is not None else 0)


@torch.no_grad()
def hf_sequential(model: nn.Module, prompts: list[list[int]], max_tokens: list[int]) -> Run:
    """``generate`` per request, one after another; greedy, EOS ignored. All requests arrived at the start,
    so a request's TTFT counts from the start of the run (its wait behind earlier requests included)."""
    dev = next(model.parameters()).device
    outs, ttft, tpot = [], [], []
    t0 = time.perf_counter()
    for p, n in zip(prompts, max_tokens):
        clock = _Clock()
        ids = torch.tensor([p], device=dev)
        with _DropEosWarning():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), streamer=clock, **_gen_kwargs(model, n))
        outs.append(out[0, len(p):].tolist())
        token_times = clock.times[1:]
        ttft.append(token_times[0] - t0)
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
        with _DropEosWarning():
            out = model.generate(ids, attention_mask=mask, streamer=clock, **_gen_kwargs(model, max(ns)))
        token_times = clock.times[1:]
        for row, n in zip(out, ns):
            outs.append(row[width:width + n].tolist())
            ttft.append(token_times[0] - t0)  # every request waited from the start of the run
            if n > 1:
                tpot.append((token_times[n - 1] - token_times[0]) / (n - 1))
    return Run(outs, time.perf_counter() - t0, ttft, tpot, notes=f"batch_size={batch_size}")


class HFContinuous:
    """transformers' continuous batching manager, created, warmed up and started *before* any clock runs (as
    labkit's KV pool is allocated outside its timed region), with labkit's page size and token budget.

    ``with HFContinuous(model, ...) as cb: run = cb.run(prompts, max_tokens)``; each request has its own
    ``max_new_tokens`` and EOS off.
    """

    def __init__(self, model: nn.Module, *, page_size: int = 16, num_blocks: int | None = None,
                 max_batch_tokens: int = 512, max_new_tokens: int = 256) -> None:
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        # transformers >= 5.17 calls the page size ``page_size``; earlier versions called it ``block_size``.
        fields = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
        size_name = "page_size" if "page_size" in fields else "block_size"
        self.config = {size_name: max(page_size, 4), "num_blocks": num_blocks, "max_batch_tokens": max_batch_tokens}
        gen = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=-1,
                               pad_token_id=model.config.pad_token_id or 0)
        # Its own copy of the model: the manager switches the copy's attention to a paged implementation while it
        # runs (transformers 5.17 keeps it switched), which must not touch the model the other baselines share.
        model = copy.deepcopy(model)
        self.model, self.attn_implementation = model, getattr(model.config, "_attn_implementation", None)
        self.manager = model.init_continuous_batching(
            generation_config=gen, continuous_batching_config=ContinuousBatchingConfig(**self.config))
        if hasattr(self.manager, "warmup"):  # captures CUDA graphs on a GPU
            self.manager.warmup()
        self.manager.start()

    def __enter__(self) -> HFContinuous:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.manager.stop(block=True, timeout=30)
        if hasattr(self.manager, "destroy"):  # transformers >= 5.17 frees its cache explicitly
            self.manager.destroy()
        # Some versions (5.17) leave the model on their paged attention after stopping; restore the original so
        # ordinary forwards and generate() keep working on the same model.
        current = getattr(self.model.config, "_attn_implementation", None)
        if self.attn_implementation and current != self.attn_implementation and \
                hasattr(self.model, "set_attn_implementation"):
            self.model.set_attn_implementation(self.attn_implementation)

    @torch.no_grad()
    def run(self, prompts: list[list[int]], max_tokens: list[int]) -> Run:
        t0 = time.perf_counter()
        ids = [self.manager.add_request(p, max_new_tokens=n, record_timestamps=True, eos_token_id=-1)
               for p, n in zip(prompts, max_tokens)]
        results: dict = {}
        while len(results) < len(ids):
            r = self.manager.get_result(timeout=1)
            if r is not None and r.is_finished():
                results[r.request_id] = r
            elif r is None and not self.manager.is_running():
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
        return Run(outs, wall, ttft, tpot, notes=f"{self.config}")
