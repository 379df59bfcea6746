"""Serving: HF sequential / static / continuous batching vs labkit's engine, contiguous and paged.

All variants serve the same requests (prompts cut from held-out text, fixed seed, greedy, EOS ignored, all
arriving at once); greedy output must equal HF ``generate`` token for token. Measurement follows the kit's
rule: every engine is built and warmed up outside the clock, then every variant runs ``repeats`` times in
rotated order, and the table reports the median output tokens/s with its IQR, min and max; a speed-up is a
ratio of medians. TTFT counts from the start of the run for every variant (all requests arrive then).
"""

from __future__ import annotations

import copy
import gc
import statistics
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from labkit import env, measure, zoo
from labkit.experiments.protocol import Target, Variant, check
from labkit.results import Record
from labkit.serve import LLM, baselines
from labkit.serve.bench import make_workload, run_engine, summarize

NAME = "serving"  # `labkit run serving`
NOTEBOOK = "06b_engine_throughput_server_speculation"


def _engine(dtype: str = "float32", **settings):
    """A builder of labkit's engine with these :class:`EngineConfig` settings (the pool's size comes later), on the
    shared fp32 model or, for another ``dtype``, on a copy of it cast to that dtype."""
    def build(model, tok, **engine_args) -> LLM:
        if env.dtype_name(next(model.parameters()).dtype) != dtype:
            model = copy.deepcopy(model).to(env.resolve_dtype(dtype))
        return LLM(model, tok, **settings, **engine_args)
    return build


def _labkit(name: str, about: str, pool: str = "full", dtype: str = "float32", **settings) -> Variant:
    settings = {"paged": True, "kv_reservation": "max_model_len", **settings}
    return Variant(name, _engine(dtype, **settings), about, {**settings, "pool": pool, "dtype": dtype})


# labkit's engines; settings["pool"]: "full" fits every request at once, "tight" forces preemption. The last two are
# one setting away from labkit-paged: an int8 KV cache (fewer bytes a token, not token-identical), and q/k/v and
# gate/up as separate matmuls (what stacking them buys)
LABKIT_VARIANTS = [
    _labkit("labkit-contiguous", "one contiguous slab per request, max length", paged=False),
    _labkit("labkit-contiguous-exact", "contiguous, reserving exactly prompt + output", paged=False,
            kv_reservation="exact"),
    _labkit("labkit-paged", "PagedAttention: blocks on demand"),
    _labkit("labkit-paged-preempt", "paged on a pool a quarter of the demand", pool="tight"),
    _labkit("labkit-paged-int8kv", "paged, K/V stored as int8 with a scale per token and head",
            kv_cache_dtype="int8"),
    _labkit("labkit-paged-separate", "paged, q/k/v and gate/up as separate matmuls (7 a layer, not 4)",
            stack_projections=False),
    _labkit("labkit-paged-bf16", "paged, weights, activations and KV cache in bf16 (dtype='auto' here); run only "
            "where bf16 is native", dtype="bfloat16"),
    _labkit("labkit-paged-prepacked", "paged, linear weights packed once for oneDNN (prepack_weights=True; CPU)",
            prepack_weights=True),
    _labkit("labkit-paged-bf16-prepacked", "paged, bf16, weights packed once for oneDNN: the fast path",
            dtype="bfloat16", prepack_weights=True),
]
HF_BF16 = "hf-continuous-bf16"  # transformers' continuous batching on the bf16 copy (where bf16 is native)
POLICIES = ("labkit-contiguous", "labkit-contiguous-exact", "labkit-paged")  # the three KV policies, one pool
EXACT = [v.name for v in LABKIT_VARIANTS
         if v.settings.get("kv_cache_dtype", "auto") == "auto" and v.settings["dtype"] == "float32"]


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
    repeats: int = 3
    warmup_requests: int = 4
    device: str = env.device_field()

    @classmethod
    def quick(cls) -> Config:
        # sized so `make report` fits its 30 minutes on 2 slow cores: ~900 output tokens a run, up to 12 variants x 3
        return cls(num_requests=24, prompt_len=(16, 160), output_len=(8, 64))

    @classmethod
    def smallest(cls) -> Config:
        """Every code path at the least work (the GPU check's rehearsal and the device tests)."""
        return cls(num_requests=3, prompt_len=(4, 12), output_len=(2, 4), static_batch_sizes=(0,), repeats=1,
                   warmup_requests=1)


def run(config: Config | None = None, progress: bool = True) -> Record:
    config = config or Config()
    device = env.resolve_device(config.device)
    model, tok = zoo.load_causal_lm(config.model, device=device, progress=False)
    prompts, max_tokens = make_workload(tok, config.num_requests, config.prompt_len, config.output_len, config.seed)
    warm = (prompts[:config.warmup_requests], [min(n, 8) for n in max_tokens[:config.warmup_requests]])
    rec = Record("serving", env=env.describe())
    bs = config.block_size
    demand_blocks = sum(-(-(len(p) + n) // bs) for p, n in zip(prompts, max_tokens))
    max_len = config.prompt_len[1] + config.output_len[1]
    pools = {"full": demand_blocks + len(prompts),  # paged: every request fits at once
             "tight": max(int(config.preempt_budget_fraction * demand_blocks), -(-max_len // bs))}
    extra: dict = {"total_demand_blocks": demand_blocks, "kv_pool_blocks": pools}

    # The reference: HF generate one request at a time, greedy, EOS off. Run once (after a warm-up).
    baselines.hf_sequential(model, *warm)
    ref = baselines.hf_sequential(model, prompts, max_tokens)
    reference = ref.token_ids

    # Build every engine outside the clock: labkit's KV pools, transformers' CB manager (started, warmed up).
    engines = {}
    weights = {"float32": model}  # one copy a dtype, shared by that dtype's engines (plain and prepacked)
    for v in LABKIT_VARIANTS:
        if v.settings["dtype"] == "bfloat16" and not env.bf16_native(device):
            continue  # emulated bf16 is slower than fp32: not a row a learner would run
        if v.settings.get("prepack_weights") and device.type != "cpu":
            continue  # packing is oneDNN's CPU layout (labkit.prepack)
        dtype = v.settings["dtype"]
        if dtype not in weights:
            weights[dtype] = copy.deepcopy(model).to(env.resolve_dtype(dtype))
        engines[v.name] = v.build(weights[dtype], tok, block_size=bs, num_blocks=pools[v.settings["pool"]],
                                  max_num_seqs=len(prompts), max_num_batched_tokens=config.max_num_batched_tokens,
                                  max_model_len=max_len, device=device)
    hf_cb = baselines.HFContinuous(model, page_size=bs, num_blocks=pools["full"],
                                   max_batch_tokens=config.max_num_batched_tokens, max_new_tokens=max(max_tokens))
    static = _StaticBatch(model, prompts, max_tokens, config.static_batch_sizes)
    fns = {"hf-static": static, "hf-continuous": lambda: hf_cb.run(prompts, max_tokens)}
    hf_bf16 = None  # transformers' continuous batching in bf16 too, where the kit has bf16 rows: the same format
    if "bfloat16" in weights:
        hf_bf16 = baselines.HFContinuous(weights["bfloat16"], page_size=bs, num_blocks=pools["full"],
                                         max_batch_tokens=config.max_num_batched_tokens,
                                         max_new_tokens=max(max_tokens))
        fns[HF_BF16] = lambda: hf_bf16.run(prompts, max_tokens)
    stats: dict[str, list] = {}
    for name, llm in engines.items():
        fns[name] = _labkit_run(llm, prompts, max_tokens, stats.setdefault(name, []))
    fns = {name: _with_peak_memory(fn, device) for name, fn in fns.items()}

    try:
        for llm in engines.values():  # one untimed warm-up each, on a few short requests
            run_engine(llm, *warm)
        hf_cb.run(*warm)
        if hf_bf16 is not None:
            hf_bf16.run(*warm)
        static.warm(*warm)
        bar = tqdm(total=config.repeats * len(fns), desc="serving variants x repeats", disable=not progress)

        def tick(name: str, r: int) -> None:
            bar.set_postfix(variant=name, repeat=r + 1)
            bar.update(1)

        runs = measure.interleaved(fns, config.repeats, progress=tick)
        bar.close()
        for name, llm in engines.items():  # KV waste: one more run each, untimed, with the telemetry on
            llm.engine.record_history = True
            llm.reset_stats()
            run_engine(llm, prompts, max_tokens)
            stats[name].append(llm.stats)
            llm.engine.record_history = False
    finally:
        hf_cb.close()
        if hf_bf16 is not None:
            hf_bf16.close()

    rec.add("hf-sequential", model=config.model, **_row([ref], reference), dtype="float32",
            notes="the greedy reference: HF generate, one request at a time; run once (after a warm-up)")
    for name in fns:
        row = _row(runs[name], reference)
        row["dtype"] = env.dtype_name(engines[name].dtype) if name in engines else \
            "bfloat16" if name == HF_BF16 else "float32"
        if name in stats:
            s = stats[name][-1]  # the recorded run: the same schedule as every timed one (greedy, same pool)
            eng = engines[name].engine
            row.update(kv_waste_pct=s.kv_waste_pct, preemptions=s.preemptions, steps=s.steps,
                       peak_blocks=s.peak_blocks, kv_pool_blocks=len(eng.bm.blocks),
                       kv_bytes_per_token=eng.kv.nbytes / len(eng.bm.blocks) / eng.bm.block_size,
                       kv_cache_dtype=eng.config.kv_cache_dtype, stack_projections=eng.config.stack_projections,
                       prepack_weights=eng.config.prepack_weights)
        rec.add(name, model=config.model, **row, notes=runs[name][0].notes)
    extra.update(hf_static_tried=static.tried, hf_static_batch_size=static.best,
                 hf_continuous_config=hf_cb.config)
    rows = {v["name"]: v for v in rec.variants}
    best_hf = max(("hf-static", "hf-continuous"), key=lambda n: rows[n]["output_tokens_per_s"])
    for name, x in measure.speedups(rows, best_hf, "output_tokens_per_s", higher_is_better=True).items():
        rows[name]["speedup_vs_baseline"] = x
    rec.config = {**asdict(config), **extra, "device": str(device), "torch_threads": torch.get_num_threads(),
                  "workload": "all requests arrive at once; prompts cut from held-out pydoc text; greedy; EOS off",
                  "reference": "hf-sequential outputs (HF generate, one request at a time, EOS off)",
                  "measurement": f"{config.warmup_requests}-request untimed warm-up per variant, then "
                                 f"{config.repeats} repeats in rotated order; median, IQR, min, max of output tok/s; "
                                 "speedup = ratio of medians vs the better HF batching variant; hf-static picks its "
                                 "batch size on the first repeat and repeats only the winner; TTFT from the run's "
                                 "start for every variant; latency percentiles pooled over repeats; "
                                 "peak_memory_bytes: the most a run added (CUDA max allocated; on CPU RSS growth "
                                 "sampled every 50 ms, a lower bound; KV pools are allocated before the clock)"}
    rec.config["targets"] = check(rec, TARGETS)
    del engines
    gc.collect()
    return rec


def _matching_share(rec: Record) -> float:
    """The smallest share of requests any exact variant (all but the int8 KV cache) served token-identical to the
    greedy reference."""
    return min(v["requests_matching"] for v in rec.variants if v["name"] not in _LOSSY) / rec.config["num_requests"]


_LOSSY = {v.name for v in LABKIT_VARIANTS} - set(EXACT) | {HF_BF16}


def _ratio(rec: Record, name: str, base: str, metric: str) -> float:
    return rec.variant(name)[metric] / rec.variant(base)[metric]


TARGETS = [
    Target("every variant token-identical to HF greedy (smallest share of requests)", _matching_share, 1.0),
    Target("labkit-paged-bf16 output tok/s / labkit-paged (fp32), where bf16 is native",
           lambda r: _ratio(r, "labkit-paged-bf16", "labkit-paged", "output_tokens_per_s"), 1.3),
    Target("labkit-paged-bf16 greedy tokens agreeing with fp32 (share before the first difference)",
           lambda r: r.variant("labkit-paged-bf16")["token_agreement"], 0.5),
    Target("labkit-paged-bf16-prepacked output tok/s / labkit-paged-bf16 (packing pays)",
           lambda r: _ratio(r, "labkit-paged-bf16-prepacked", "labkit-paged-bf16", "output_tokens_per_s"), 1.0),
    Target("labkit-paged-bf16-prepacked output tok/s / hf-continuous-bf16 (the same format)",
           lambda r: _ratio(r, "labkit-paged-bf16-prepacked", HF_BF16, "output_tokens_per_s"), 1.0),
    Target("labkit-paged kv_waste_pct", lambda r: r.variant("labkit-paged")["kv_waste_pct"], 8.0, "max"),
    Target("labkit-paged output tok/s / the better HF batching", lambda r: r.variant("labkit-paged")[
        "speedup_vs_baseline"], 1.0),
    Target("labkit-paged-preempt preemptions (the tight pool really preempts)",
           lambda r: r.variant("labkit-paged-preempt")["preemptions"], 1),
    Target("labkit-paged-int8kv KV bytes a token / labkit-paged",
           lambda r: _ratio(r, "labkit-paged-int8kv", "labkit-paged", "kv_bytes_per_token"), 0.3, "max"),
    Target("labkit-paged-int8kv requests token-identical to greedy (share; int8 K/V may change a token)",
           lambda r: r.variant("labkit-paged-int8kv")["requests_matching"] / r.config["num_requests"], 0.5),
]


def figures(rec: Record) -> list:
    """Output tokens/s of every serving variant, with the min–max of its repeats."""
    from labkit.viz.plots import metric_bars

    return [metric_bars(rec, "output_tokens_per_s", title="serving: output tokens/s (median, min–max)")]


class _StaticBatch:
    """hf-static: tries every batch size on the first call, then repeats only the fastest."""

    def __init__(self, model, prompts, max_tokens, sizes: tuple[int, ...]) -> None:
        self.model, self.prompts, self.max_tokens = model, prompts, max_tokens
        self.sizes = [b or len(prompts) for b in sizes]
        self.best: int | None = None
        self.tried: dict[int, float] = {}

    def warm(self, prompts, max_tokens) -> None:
        baselines.hf_static(self.model, prompts, max_tokens, len(prompts))

    def __call__(self) -> baselines.Run:
        if self.best is None:
            runs = {b: baselines.hf_static(self.model, self.prompts, self.max_tokens, b) for b in self.sizes}
            self.tried = {b: round(r.wall_s, 2) for b, r in runs.items()}
            self.best = min(runs, key=lambda b: runs[b].wall_s)
            return runs[self.best]
        return baselines.hf_static(self.model, self.prompts, self.max_tokens, self.best)


def _with_peak_memory(fn, device):
    """Run ``fn`` and attach the peak memory it added (CUDA: max allocated; CPU: RSS growth, a lower bound)."""
    def timed() -> baselines.Run:
        with measure.track_peak_memory(device, interval_s=0.05) as pm:
            run = fn()
        run.peak_memory_bytes = pm.peak_bytes
        return run
    return timed


def _labkit_run(llm: LLM, prompts, max_tokens, stats_out: list):
    def fn() -> baselines.Run:
        llm.reset_stats()
        r = run_engine(llm, prompts, max_tokens)
        stats_out.append(llm.stats)
        return r
    return fn


def _row(runs: list[baselines.Run], reference: list[list[int]]) -> dict:
    """Median throughput with its spread over repeats; latency percentiles pooled; exact match on every repeat."""
    rows = [summarize(r, reference) for r in runs]
    tps = [r["output_tokens_per_s"] for r in rows]
    sp = measure.spread(tps)
    median_run = min(range(len(runs)), key=lambda i: abs(tps[i] - sp["median"]))
    pooled = summarize(baselines.Run([t for r in runs for t in r.token_ids], sum(r.wall_s for r in runs),
                                     [x for r in runs for x in r.ttft_s], [x for r in runs for x in r.tpot_s]))
    return {"output_tokens_per_s": sp["median"], "output_tokens_per_s_iqr": sp["iqr"],
            "output_tokens_per_s_min": sp["min"], "output_tokens_per_s_max": sp["max"],
            "output_tokens_per_s_runs": tps, "repeats": len(runs),
            "wall_s": statistics.median(r["wall_s"] for r in rows), "output_tokens": rows[0]["output_tokens"],
            **{k: pooled[k] for k in pooled if k.startswith(("ttft_", "tpot_"))},
            "ttft_ms_per_request": [round(x * 1e3, 1) for x in runs[median_run].ttft_s],
            "peak_memory_bytes": max((r.peak_memory_bytes for r in runs if r.peak_memory_bytes is not None),
                                     default=None),
            "matches_reference": all(r["matches_reference"] for r in rows),
            "requests_matching": min(r["requests_matching"] for r in rows),
            "token_agreement": min(r["token_agreement"] for r in rows)}


def kv_policies(model, tok, prompts: list[list[int]], max_tokens: list[int], *, num_blocks: int,
                block_size: int = 16, max_model_len: int | None = None, repeats: int = 2) -> list[dict]:
    """The three KV policies on one fixed pool of ``num_blocks``: max-length reservation, exact reservation
    (both contiguous) and paging — rotated repeats after a warm-up, median tok/s, waste, the most requests that
    ran at once, and each engine's step history (for :func:`labkit.serve.figures.admitted_figure`)."""
    max_model_len = max_model_len or max(len(p) for p in prompts) + max(max_tokens)
    engines = {v.name: v.build(model, tok, block_size=block_size, num_blocks=num_blocks, max_num_seqs=len(prompts),
                               max_model_len=max_model_len, record_history=True)
               for v in LABKIT_VARIANTS if v.name in POLICIES}
    for llm in engines.values():
        run_engine(llm, prompts[:2], [min(4, n) for n in max_tokens[:2]])

    def fn(llm):
        def go():
            llm.reset_stats()  # fresh stats, so the history is this run's alone
            return run_engine(llm, prompts, max_tokens)
        return go

    runs = measure.interleaved({n: fn(llm) for n, llm in engines.items()}, repeats)
    rows = []
    for name, llm in engines.items():
        sp = measure.spread([summarize(r)["output_tokens_per_s"] for r in runs[name]])
        hist = llm.stats.history
        rows.append({"name": name, "output_tokens_per_s": sp["median"], "repeats": sp["n"],
                     "output_tokens_per_s_min": sp["min"], "output_tokens_per_s_max": sp["max"],
                     "most_running_at_once": max(len(s["running"]) for s in hist), "steps": llm.stats.steps,
                     "kv_waste_pct": llm.stats.kv_waste_pct, "num_blocks": num_blocks,
                     **{f"{k}_pct": v for k, v in llm.stats.waste_breakdown_pct().items()}, "history": list(hist)})
    return rows


def batch_sweep(model, tok, batch_sizes: list[int], *, prompt_len: int = 32, new_tokens: int = 16,
                repeats: int = 3) -> list[dict]:
    """Decode tokens/s of the paged engine with ``B`` requests decoding together, for each ``B``, beside this
    machine's measured ceilings (:mod:`labkit.roofline`): the weights are read once a step for all ``B``.
    Decode speed is ``B / median time per output token`` (prefill excluded); rotated repeats after a warm-up."""
    from labkit import roofline

    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes={batch_sizes!r}: give one or more positive integers")
    dev = measure.model_device(model)
    ceil = roofline.ceilings(str(dev), next(model.parameters()).dtype)  # the GEMM at the dtype the model computes in
    wbytes, params = measure.weight_bytes(model), measure.param_count(model)
    work, engines = {}, {}
    for b in batch_sizes:
        work[b] = make_workload(tok, b, prompt_len=(prompt_len, prompt_len), output_len=(new_tokens, new_tokens),
                                seed=b)
        engines[b] = LLM(model, tok, block_size=16, max_num_seqs=b, max_model_len=prompt_len + new_tokens + 16,
                         num_blocks=b * (-(-(prompt_len + new_tokens) // 16) + 1), device=str(dev))
        run_engine(engines[b], work[b][0][:1], [4])  # warm-up
    runs = measure.interleaved({b: (lambda b=b: run_engine(engines[b], *work[b])) for b in batch_sizes}, repeats)
    rows = []
    for b in batch_sizes:
        sp = measure.spread([b / statistics.median(r.tpot_s) for r in runs[b]])
        c = ceil.decode_tokens_per_s(wbytes, params, b)
        rows.append({"batch": b, "decode_tok_s": sp["median"], "decode_tok_s_min": sp["min"],
                     "decode_tok_s_max": sp["max"], "per_request_tok_s": sp["median"] / b, **c,
                     "pct_of_ceiling": 100 * sp["median"] / c["ceiling_tok_s"],
                     "weight_gb_s": sp["median"] / b * wbytes / 1e9,
                     "gflop_s": sp["median"] * 2 * params / 1e9})
    return rows
