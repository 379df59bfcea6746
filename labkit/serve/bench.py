"""Serving workloads and latency statistics shared by the experiment, the notebook and the load generator."""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

from labkit import data, evaluate, measure
from labkit.serve.baselines import Run
from labkit.serve.llm import LLM
from labkit.serve.sampling import SamplingParams


def make_workload(tokenizer: Any, n: int, prompt_len: tuple[int, int] = (16, 256),
                  output_len: tuple[int, int] = (8, 128), seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """``n`` prompts cut from held-out text at seeded random offsets, with uniform random lengths, and a
    uniform random output length for each."""
    rng = random.Random(seed)
    ids = data.token_windows(tokenizer, "evaluation", window=10**9)[0][0][0].tolist()
    prompts, outs = [], []
    for _ in range(n):
        length = rng.randint(*prompt_len)
        start = rng.randrange(0, len(ids) - length)
        prompts.append(ids[start:start + length])
        outs.append(rng.randint(*output_len))
    return prompts, outs


def run_engine(llm: LLM, prompts: list[list[int]], max_tokens: list[int]) -> Run:
    """All requests at once through the labkit engine (greedy, EOS ignored)."""
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in max_tokens]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    ttft = [o.first_token_time - t0 for o in outs]
    tpot = [o.tpot_s for o in outs if o.tpot_s is not None]
    return Run([o.token_ids for o in outs], wall, ttft, tpot)


def summarize(run: Run, reference: list[list[int]] | None = None) -> dict[str, Any]:
    """Record metrics of a run: output tokens/s, TTFT / TPOT percentiles, exact match with the reference."""
    n_out = sum(len(t) for t in run.token_ids)
    row = {"output_tokens_per_s": n_out / run.wall_s, "wall_s": run.wall_s, "output_tokens": n_out,
           "requests_per_s": len(run.token_ids) / run.wall_s}
    for name, vals in (("ttft", run.ttft_s), ("tpot", run.tpot_s)):
        ms = [v * 1e3 for v in vals]
        row[f"{name}_ms_p50"] = measure.percentile(ms, 50)
        row[f"{name}_ms_p99"] = measure.percentile(ms, 99)
        row[f"{name}_ms_mean"] = statistics.fmean(ms) if ms else None
    if reference is not None:
        same = [a == b for a, b in zip(run.token_ids, reference)]
        row["matches_reference"] = all(same) and len(same) == len(reference)
        row["requests_matching"] = sum(same)
        row["token_agreement"] = evaluate.token_agreement(run.token_ids, reference)
    return row


def kv_history(model, tokenizer, prompts, params, *, max_model_len: int = 384, max_num_seqs: int = 8,
               max_num_batched_tokens: int = 128):
    """A ``rerun`` for :class:`labkit.viz.widgets.KVCacheViewer`: serve ``prompts`` on a fresh engine with the
    viewer's block size, pool and prefix caching; return its step history."""
    def rerun(block_size: int, num_blocks: int, prefix_caching: bool) -> list[dict[str, Any]]:
        llm = LLM(model, tokenizer, block_size=block_size, num_blocks=num_blocks, max_model_len=max_model_len,
                  max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                  enable_prefix_caching=prefix_caching, record_history=True)
        llm.generate(prompts, params, use_tqdm=False)
        return llm.stats.history
    return rerun
