"""Serving: HF sequential / static / continuous batching vs labkit's engine, contiguous and paged.

All variants serve the same requests (prompts cut from held-out text, fixed seed, greedy, EOS ignored,
all arriving at once); greedy output must equal HF ``generate`` token for token.
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from labkit import env, zoo
from labkit.results import Record
from labkit.serve import LLM
from labkit.serve import baselines as B
from labkit.serve.bench import make_workload, run_engine, summarize


@dataclass
class Config:
    model: str = "smollm2-135m"
    num_requests: int = 128
    prompt_len: tuple[int, int] = (16, 256)
    output_len: tuple[int, int] = (8, 128)
    seed: int = 0
    block_size: int = 16
    max_num_batched_tokens: int = 512
    static_batch_sizes: tuple[int, ...] = (16, 0)  # 0 = all requests in one batch
    preempt_budget_fraction: float = 0.25

    @classmethod
    def quick(cls) -> Config:
        return cls(num_requests=48)


def run(config: Config | None = None, progress: bool = True) -> Record:
    config = config or Config()
    device = env.default_device()
    model, tok = zoo.load_causal_lm(config.model, device=device, progress=False)
    prompts, max_tokens = make_workload(tok, config.num_requests, config.prompt_len, config.output_len, config.seed)
    rec = Record("serving", env=env.describe())
    bs = config.block_size
    demand_blocks = sum(-(-(len(p) + n) // bs) for p, n in zip(prompts, max_tokens))
    max_len = config.prompt_len[1] + config.output_len[1]
    steps = ["hf-sequential", "hf-static", "hf-continuous", "labkit-contiguous", "labkit-paged",
             "labkit-paged-preempt"]
    bar = tqdm(steps, desc="serving variants", disable=not progress)
    reference = None
    extra_cfg: dict = {"peak_demand_blocks": demand_blocks}
    for name in bar:
        bar.set_postfix(variant=name)
        stats = None
        if name == "hf-sequential":
            r = B.hf_sequential(model, prompts, max_tokens)
            reference = r.token_ids
        elif name == "hf-static":
            runs = {b or len(prompts): B.hf_static(model, prompts, max_tokens, b or len(prompts))
                    for b in config.static_batch_sizes}
            best = min(runs, key=lambda b: runs[b].wall_s)
            r = runs[best]
            extra_cfg["hf_static_batch_sizes_tried"] = {b: round(x.wall_s, 2) for b, x in runs.items()}
            extra_cfg["hf_static_best_batch_size"] = best
        elif name == "hf-continuous":
            r = B.hf_continuous(model, prompts, max_tokens)
        else:
            num_blocks = demand_blocks + len(prompts)  # every request fits at once, paged
            if name == "labkit-paged-preempt":
                num_blocks = max(int(config.preempt_budget_fraction * demand_blocks), -(-max_len // bs))
            llm = LLM(model, tok, block_size=bs, num_blocks=num_blocks, max_num_seqs=len(prompts),
                      max_num_batched_tokens=config.max_num_batched_tokens, max_model_len=max_len,
                      paged=name != "labkit-contiguous")
            r = run_engine(llm, prompts, max_tokens)
            stats = llm.stats
            extra_cfg[f"{name}_num_blocks"] = num_blocks
        row = summarize(r, reference)
        if stats is not None:
            row.update(kv_waste_pct=stats.kv_waste_pct, preemptions=stats.preemptions, steps=stats.steps,
                       peak_blocks=stats.peak_blocks)
        rec.add(name, model=config.model, **row, notes=r.notes)
        gc.collect()
    best_hf = max(rec.variant(n)["output_tokens_per_s"] for n in ("hf-static", "hf-continuous"))
    for v in rec.variants:
        v["speedup_vs_baseline"] = v["output_tokens_per_s"] / best_hf
    rec.config = {**asdict(config), **extra_cfg, "device": str(device), "torch_threads": torch.get_num_threads(),
                  "workload": "all requests arrive at once; prompts cut from held-out pydoc text; greedy; ignore_eos",
                  "reference": "hf-sequential outputs (HF generate, one request at a time)"}
    return rec
