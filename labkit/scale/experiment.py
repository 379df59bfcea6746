"""Serving at scale (lesson 06c), measured on this machine: one engine under a sweep of Poisson arrival rates
(goodput under an SLO, p99 TTFT, the knee, Little's law), one replica with every core against one replica a core
behind vllm-router, round-robin against cache-aware routing on chat-shaped traffic (a few long system prompts, many
short questions), a replica killed mid-run, and tensor parallelism (``tp_size`` ranks over torch.distributed against
one process: tokens, speed, bytes all-reduced). Every load runs ``repeats`` times in rotated order
(:func:`labkit.measure.interleaved`); rows hold medians with min and max. Greedy answers through the router must
equal the single engine's.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from labkit import LabkitError, env, measure
from labkit.experiments.protocol import Target, check
from labkit.results import Record
from labkit.scale.load import SLO, MetricsSampler, attainment, default_slo, goodput, knee, knee_sentence, littles_law

NAME = "scale"  # `labkit run scale`
NOTEBOOK = "06c_serving_at_scale"


@dataclass
class Config:
    model: str = "smollm2-135m"
    rates: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
    requests_per_rate: int = 24
    prompt_len: tuple[int, int] = (32, 128)
    output_len: tuple[int, int] = (16, 48)
    slack: float = 5.0  # the SLO is slack × the one-request latency (labkit.scale.load.default_slo)
    replica_rate: float = 4.0  # past one engine's knee on 2 cores: where more capacity should show
    replica_requests: int = 24
    system_prompts: int = 3
    system_prompt_tokens: int = 256
    questions: int = 24
    question_tokens: tuple[int, int] = (8, 24)
    routing_rate: float = 4.0
    routing_output_tokens: int = 8
    tp_size: int = 3  # SmolLM2-135M's 9 query and 3 KV heads split over 3 ranks (2 would not split them)
    tp_tokens: int = 16
    repeats: int = 3
    seed: int = 0
    device: str = env.device_field()  # the in-process engine's; each replica picks its own (`labkit serve`)
    dtype: str = "float32"  # explicit, as every experiment's rows are: lesson 00 measures what bf16 changes

    @classmethod
    def quick(cls) -> Config:
        return cls(rates=(1.0, 2.0, 4.0), requests_per_rate=8, output_len=(8, 16), replica_requests=8,
                   questions=8, system_prompt_tokens=192, tp_tokens=8)

    @classmethod
    def smallest(cls) -> Config:
        return cls(rates=(1.0, 4.0), requests_per_rate=3, output_len=(2, 4), replica_requests=3, questions=3,
                   system_prompts=1, system_prompt_tokens=32, routing_output_tokens=2, repeats=1, tp_tokens=4)


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def chat_workload(n: int, system_prompts: int, system_tokens: int, question_tokens: tuple[int, int],
                  output_tokens: int, seed: int) -> list[tuple[list[int], int]]:
    """``n`` requests as chat traffic is: one of a few long system prompts, then a short question of its own."""
    rng = random.Random(seed)
    systems = [[rng.randint(100, 30000) for _ in range(system_tokens)] for _ in range(system_prompts)]
    return [(systems[i % system_prompts] + [rng.randint(100, 30000) for _ in range(rng.randint(*question_tokens))],
             output_tokens) for i in range(n)]


def _load(url: str, rate: float, n: int, config: Config, slo: SLO, workload=None, sample: bool = False) -> dict:
    """One load run: the summary, goodput under ``slo`` and, with ``sample``, Little's law from /metrics."""
    from labkit.serve.client import bench_serve

    sampler = MetricsSampler(url) if sample else None
    if sampler:
        sampler.__enter__()
    t0 = time.perf_counter()
    try:
        s = bench_serve(url, model=config.model, num_requests=n, request_rate=rate, prompt_len=config.prompt_len,
                        output_len=config.output_len, seed=config.seed, slo_ttft_ms=slo.ttft_ms,
                        slo_tpot_ms=slo.tpot_ms, workload=workload)
    finally:
        if sampler:
            sampler.__exit__(None, None, None)
    t1 = time.perf_counter()
    s["goodput"] = goodput(s["per_request"], s["duration_s"], slo.ttft_ms, slo.tpot_ms)
    s["attainment"] = attainment(s["per_request"], slo.ttft_ms, slo.tpot_ms)
    if sampler:
        e2e = [r["e2e_ms"] / 1e3 for r in s["per_request"] if r["e2e_ms"] is not None]
        s["little"] = littles_law(sampler.between(t0, t1), s["completed"] / (t1 - t0), statistics.mean(e2e))
    return s


def _greedy_texts(url: str, model: str, prompts: list[str], max_tokens: int = 12) -> list[str]:
    import json
    import urllib.request

    out = []
    for p in prompts:
        body = json.dumps({"model": model, "prompt": p, "max_tokens": max_tokens, "temperature": 0.0}).encode()
        req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            out.append(json.loads(resp.read())["choices"][0]["text"])
    return out


GREEDY_PROMPTS = ["The capital of France is", "Water boils at", "A haiku about autumn:"]


def _sweep(rec: Record, config: Config, bar) -> SLO:
    """One engine in this process (every core), a sweep of arrival rates; returns the SLO it used."""
    from labkit.serve import LLM
    from labkit.serve.server import start_server, stop_server

    llm = LLM(config.model, device=env.resolve_device(config.device), dtype=config.dtype, enable_prefix_caching=True)
    dtype = env.dtype_name(llm.dtype)
    srv = start_server(llm, config.model)
    url = f"http://127.0.0.1:{srv.port}"
    try:
        rec.config["reference_texts"] = _greedy_texts(url, config.model, GREEDY_PROMPTS)
        alone = [_load(url, float("inf"), 1, config, SLO()) for _ in range(3)]  # also the warm-up
        ttft = statistics.median(a["ttft_ms_p50"] for a in alone)
        tpot = statistics.median(a["tpot_ms_p50"] for a in alone)
        slo = default_slo(ttft, tpot, config.slack)
        rec.config.update(slo=asdict(slo), alone_ttft_ms=ttft, alone_tpot_ms=tpot)
        runs = measure.interleaved({r: (lambda r=r: _load(url, r, config.requests_per_rate, config, slo, sample=True))
                                    for r in config.rates}, config.repeats, progress=lambda *_: bar.update())
    finally:
        stop_server(srv)
    for rate in config.rates:
        got = runs[rate]
        g = _stats([s["goodput"] for s in got])
        p99 = _stats([s["ttft_ms_p99"] for s in got])
        little = [s["little"]["ratio"] for s in got]
        rec.add(f"rate-{rate:g}", model=f"{config.model} · one engine", dtype=dtype, offered_rps=rate,
                goodput_rps=g["median"],
                goodput_rps_min=g["min"], goodput_rps_max=g["max"],
                slo_attainment=statistics.median(s["attainment"] for s in got),
                request_rps=statistics.median(s["request_throughput"] for s in got), ttft_ms_p99=p99["median"],
                ttft_ms_p99_min=p99["min"], ttft_ms_p99_max=p99["max"],
                ttft_ms_p50=statistics.median(s["ttft_ms_p50"] for s in got),
                tpot_ms_p99=statistics.median(s["tpot_ms_p99"] for s in got),
                output_tokens_per_s=statistics.median(s["output_token_throughput"] for s in got),
                little_L_measured=statistics.median(s["little"]["L_measured"] for s in got),
                little_L_predicted=statistics.median(s["little"]["L_predicted"] for s in got),
                little_ratio=statistics.median(little), failed=sum(s["failed"] for s in got),
                goodput_runs=[s["goodput"] for s in got],
                requests_runs=[{"duration_s": round(s["duration_s"], 3), "per_request": [
                    {k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items() if k != "e2e_ms"}
                    for r in s["per_request"]]} for s in got])
    rates = list(config.rates)
    row = {r: rec.variant(f"rate-{r:g}") for r in rates}
    goods, p99s = [row[r]["goodput_rps"] for r in rates], [row[r]["ttft_ms_p99"] for r in rates]
    attained = [row[r]["slo_attainment"] for r in rates]
    rec.config["knee_rps"] = knee(rates, attained)
    rec.config["knee_sentence"] = knee_sentence(rates, goods, attained, p99s, slo)
    return slo


def _fleets(rec: Record, config: Config, slo: SLO, bar) -> None:
    """One replica on every core against one replica a core behind vllm-router; routing policies; a kill."""
    from labkit.scale.fleet import Fleet, core_shares

    cores = core_shares(1)[0]
    serve_args = ("--enable-prefix-caching", "--dtype", config.dtype)
    served = env.dtype_name(env.resolve_dtype(config.dtype))  # what every replica computes in
    with Fleet(1, config.model, serve_args) as one, Fleet(len(cores), config.model, serve_args) as many:
        many_url = many.route("round_robin")
        rec.config["router_texts"] = _greedy_texts(many_url, config.model, GREEDY_PROMPTS)
        urls = {f"1 replica × {len(cores)} threads": one.members[0].url,
                f"{len(cores)} replicas × 1 thread (round_robin)": many_url}
        for u in urls.values():
            _load(u, float("inf"), 2, config, slo)  # warm-up
        runs = measure.interleaved({k: (lambda u=u: _load(u, config.replica_rate, config.replica_requests, config,
                                                          slo)) for k, u in urls.items()},
                                   config.repeats, progress=lambda *_: bar.update())
        for name, got in runs.items():
            g, p99 = _stats([s["goodput"] for s in got]), _stats([s["ttft_ms_p99"] for s in got])
            rec.add(name, model=f"{config.model} · replicas", dtype=served, offered_rps=config.replica_rate,
                    goodput_rps=g["median"], goodput_rps_min=g["min"], goodput_rps_max=g["max"],
                    slo_attainment=statistics.median(s["attainment"] for s in got),
                    ttft_ms_p99=p99["median"], ttft_ms_p99_min=p99["min"], ttft_ms_p99_max=p99["max"],
                    output_tokens_per_s=statistics.median(s["output_token_throughput"] for s in got),
                    failed=sum(s["failed"] for s in got))
        one.stop()
        counter = iter(range(1, 10_000))

        def routed(policy: str) -> dict:
            url = many.route(policy)
            before = many.prefix_hits()
            work = chat_workload(config.questions, config.system_prompts, config.system_prompt_tokens,
                                 config.question_tokens, config.routing_output_tokens, seed=next(counter))
            s = _load(url, config.routing_rate, len(work), config, slo, workload=work)  # fresh prefixes each run
            after = many.prefix_hits()
            q = sum(a["queries"] - b["queries"] for a, b in zip(after, before))
            s["hit_rate"] = sum(a["hits"] - b["hits"] for a, b in zip(after, before)) / q if q else 0.0
            return s

        runs = measure.interleaved({p: (lambda p=p: routed(p)) for p in ("round_robin", "cache_aware")},
                                   config.repeats, progress=lambda *_: bar.update())
        for policy, got in runs.items():
            hit = _stats([s["hit_rate"] for s in got])
            rec.add(f"route-{policy}", model=f"{config.model} · chat traffic", dtype=served, policy=policy,
                    offered_rps=config.routing_rate, prefix_hit_rate=hit["median"], prefix_hit_rate_min=hit["min"],
                    prefix_hit_rate_max=hit["max"], ttft_ms_p50=statistics.median(s["ttft_ms_p50"] for s in got),
                    ttft_ms_p99=statistics.median(s["ttft_ms_p99"] for s in got),
                    goodput_rps=statistics.median(s["goodput"] for s in got), failed=sum(s["failed"] for s in got))
        rr, ca = rec.variant("route-round_robin"), rec.variant("route-cache_aware")
        rec.config["routing_sentence"] = (
            f"Cache-aware routing found {100 * ca['prefix_hit_rate']:.0f} % of prompt tokens in a replica's prefix "
            f"cache against round-robin's {100 * rr['prefix_hit_rate']:.0f} %; median TTFT "
            f"{ca['ttft_ms_p50']:,.0f} ms against {rr['ttft_ms_p50']:,.0f} ms "
            f"({rr['ttft_ms_p50'] / ca['ttft_ms_p50']:.2f}× in cache-aware's favour)." if ca["ttft_ms_p50"] else "")
        url = many.route("round_robin")
        result: dict = {}
        loader = threading.Thread(target=lambda: result.update(_load(url, config.replica_rate,
                                                                      config.replica_requests, config, slo)))
        loader.start()
        time.sleep(config.replica_requests / config.replica_rate / 3)
        many.kill(len(many.members) - 1)
        loader.join()
        bar.update()
        rec.add("replica-killed", model=f"{config.model} · replicas", dtype=served,
                requests=result["requests"],
                completed=result["completed"], failed=result["failed"],
                lost=result["requests"] - result["completed"] - result["failed"],
                errors="; ".join(result["errors"])[:300])


def _tensor_parallel(rec: Record, config: Config, bar) -> None:
    """The same greedy requests through one process and through ``tp_size`` ranks (gloo on the CPU, NCCL on GPUs):
    tokens, decode speed (rotated repeats), and the bytes all-reduced a token against the formula."""
    from labkit import zoo
    from labkit.serve import LLM, SamplingParams

    device = env.resolve_device(config.device)
    if device.type == "cuda" and torch.cuda.device_count() < config.tp_size:
        rec.config["tensor_parallel"] = {"status": "skipped", "reason": f"tensor_parallel_size={config.tp_size} "
                                         f"needs {config.tp_size} GPUs; this machine has {torch.cuda.device_count()}"}
        return
    from labkit.serve.tensor_parallel import allowed_sizes

    model, tok = zoo.load_causal_lm(config.model, device=device, progress=False)
    sizes = allowed_sizes(model.config)
    k = config.tp_size if config.tp_size in sizes else max(sizes)  # a smaller model's heads may split otherwise
    if k == 1:
        rec.config["tensor_parallel"] = {"status": "skipped", "reason": f"{config.model}'s heads split no way"}
        return
    rec.config["tensor_parallel"] = {"status": "measured", "size": k}
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in GREEDY_PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=config.tp_tokens, ignore_eos=True)
    engines = {1: LLM(model, tok, device=device, max_model_len=256, max_num_seqs=8),
               k: LLM(model, tok, device=device, max_model_len=256, max_num_seqs=8, tensor_parallel_size=k)}
    try:
        def run(size: int) -> tuple[float, list[list[int]]]:
            t0 = time.perf_counter()
            outs = engines[size].generate(prompts, params, use_tqdm=False)
            return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0), [o.token_ids for o in outs]

        for size in engines:
            run(size)  # warm-up
        tp = engines[k].engine.tp
        before = (tp.reducer.bytes, sum(len(p) for p in prompts))
        runs = measure.interleaved({size: (lambda size=size: run(size)) for size in engines}, config.repeats,
                                   progress=lambda *_: bar.update())
        fed = config.repeats * sum(len(p) + config.tp_tokens - 1 for p in prompts)  # tokens through the layers
        measured = (tp.reducer.bytes - before[0]) / fed
        cfg = model.config
        formula = 2 * cfg.num_hidden_layers * cfg.hidden_size * next(model.parameters()).element_size()
        want = runs[1][0][1]
        for size, got in runs.items():
            speed = _stats([g[0] for g in got])
            rec.add(f"tp-{size}", model=f"{config.model} · tensor parallel", dtype=env.dtype_name(engines[1].dtype),
                    tensor_parallel_size=size,
                    output_tokens_per_s=speed["median"], output_tokens_per_s_min=speed["min"],
                    output_tokens_per_s_max=speed["max"], matches_reference=all(g[1] == want for g in got),
                    **({"allreduce_bytes_per_token": measured, "allreduce_bytes_per_token_formula": formula}
                       if size > 1 else {}))
    finally:
        for llm in engines.values():
            llm.close()


TARGETS = [
    Target("little's law within 25 % at every rate",
           lambda r: max(abs(v["little_ratio"] - 1) for v in r.variants if "little_ratio" in v), 0.25, "max"),
    Target("no request lost when a replica dies", lambda r: r.variant("replica-killed")["lost"], 0, "max"),
    Target("greedy answers through the router equal the single engine's",
           lambda r: None if "router_texts" not in r.config else
           float(r.config["router_texts"] == r.config["reference_texts"]), 1.0),
    Target("tensor parallel ranks give the single engine's greedy tokens",
           lambda r: float(all(v["matches_reference"] for v in r.variants if v["name"].startswith("tp-")))
           if any(v["name"].startswith("tp-") for v in r.variants) else None, 1.0),
    Target("bytes all-reduced a token equal 2 × layers × hidden × dtype bytes",
           lambda r: next(abs(v["allreduce_bytes_per_token"] / v["allreduce_bytes_per_token_formula"] - 1)
                          for v in r.variants if "allreduce_bytes_per_token" in v), 0.0, "max"),
    Target("cache-aware routing hits the prefix cache at least as often as round-robin",
           lambda r: r.variant("route-cache_aware")["prefix_hit_rate"]
           - r.variant("route-round_robin")["prefix_hit_rate"], 0.0),
]


def run(config: Config | None = None, progress: bool = True) -> Record:
    config = config or Config()
    rec = Record(NAME, env=env.describe())
    rec.config.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()})
    steps = len(config.rates) * config.repeats + 2 * config.repeats + 2 * config.repeats + 1 + 2 * config.repeats
    from labkit.scale.fleet import router_binary

    with tqdm(total=steps, desc="scale", disable=not progress) as bar:
        slo = _sweep(rec, config, bar)
        try:
            router_binary()
        except LabkitError as e:  # the sweep stands alone; the fleet's targets read "not measured"
            rec.config["fleet"] = {"status": "skipped", "reason": str(e)}
            print(f"scale: replicas and routing skipped: {e}")
        else:
            _fleets(rec, config, slo, bar)
        _tensor_parallel(rec, config, bar)
    rec.config["targets"] = check(rec, TARGETS)
    return rec


def headline(rec: Record) -> str:
    """The record's claim in one line (the report and README show it): the knee, and what routing bought."""
    parts = []
    slo = rec.config.get("slo") or {}
    k = rec.config.get("knee_rps")
    if slo:
        parts.append(f"one engine keeps ≥ 90 % of requests within TTFT ≤ {slo['ttft_ms']:g} ms, TPOT ≤ "
                     f"{slo['tpot_ms']:g} ms up to {k:g} req/s" if k is not None else
                     "one engine misses its SLO at every rate tried")
    try:
        rr, ca = rec.variant("route-round_robin"), rec.variant("route-cache_aware")
    except LabkitError:
        return "; ".join(parts)
    parts.append(f"cache-aware routing: {100 * ca['prefix_hit_rate']:.0f} % of prompt tokens from the prefix cache "
                 f"(round-robin {100 * rr['prefix_hit_rate']:.0f} %), median TTFT "
                 f"{rr['ttft_ms_p50'] / ca['ttft_ms_p50']:.2f}× lower")
    return "; ".join(parts)


def figures(rec: Record) -> list:
    from labkit.scale.figures import load_curve, routing_bars

    return [f for f in (load_curve(rec), routing_bars(rec)) if f is not None]
