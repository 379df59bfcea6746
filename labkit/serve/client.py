"""``labkit bench-serve``: a load generator for any OpenAI-compatible server (labkit's, vLLM, TGI ...).

Requests arrive as a Poisson process at ``request_rate`` per second (``inf``: all at once), with seeded
random prompt and output lengths. Prompts are token-id lists (the OpenAI API accepts them) so lengths are
exact; ``ignore_eos`` makes each request produce exactly its output length on servers that support it
(labkit, vLLM). Each request streams, so we time the first token (TTFT), the gaps between tokens (ITL), the
time per output token after the first (TPOT) and the whole request (E2E).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labkit import LabkitError, measure
from labkit.results import atomic_write_text


@dataclass
class RequestResult:
    prompt_len: int
    output_len: int = 0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if self.output_len < 2 or self.e2e_s is None or self.ttft_s is None:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_len - 1)


async def _stream_one(client, base: str, model: str, prompt: list[int], max_tokens: int) -> RequestResult:
    """One streamed completion; every failure (HTTP status, error event, broken stream) is recorded."""
    res = RequestResult(prompt_len=len(prompt))
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = last = time.perf_counter()
    done, chunks = False, 0
    try:
        async with client.stream("POST", base + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = f"error event: {chunk['error'].get('message', chunk['error'])}"[:200]
                    return res
                if chunk.get("usage"):
                    res.output_len = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices"):
                    continue
                chunks += 1
                now = time.perf_counter()
                if res.ttft_s is None:
                    res.ttft_s = now - start
                else:
                    res.itl_s.append(now - last)
                last = now
        if not done:
            res.error = "the stream ended without data: [DONE]"
            return res
        res.e2e_s = time.perf_counter() - start
        res.output_len = res.output_len or chunks  # servers without usage: one chunk per token
    except Exception as exc:  # noqa: BLE001 - a load generator counts every failure, whatever it is
        res.error = f"{type(exc).__name__}: {exc}"[:200]
    return res


def _model_name(base: str, timeout: float) -> str:
    import httpx

    try:
        return httpx.get(base + "/v1/models", timeout=timeout).json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise LabkitError(f"no OpenAI-compatible server answers at {base} ({exc})") from None


def _check_range(name: str, value: tuple[int, int]) -> tuple[int, int]:
    if len(value) != 2 or not all(isinstance(v, int) and v >= 1 for v in value) or value[0] > value[1]:
        raise LabkitError(f"{name}={tuple(value)} must be (MIN, MAX) with 1 <= MIN <= MAX")
    return value[0], value[1]


def check_out_path(out: str | Path | None) -> Path | None:
    """``--out`` must name a file in a directory that exists (checked before the run, not after)."""
    if out is None:
        return None
    out = Path(out)
    if out.is_dir():
        raise LabkitError(f"out={str(out)!r} is a directory; give a file name such as {str(out / 'bench.json')!r}")
    if not out.parent.is_dir():
        raise LabkitError(f"out={str(out)!r}: the directory {str(out.parent)!r} does not exist")
    return out


def bench_serve(url: str = "http://127.0.0.1:8000", *, model: str | None = None, num_requests: int = 32,
                request_rate: float = float("inf"), prompt_len: tuple[int, int] = (16, 256),
                output_len: tuple[int, int] = (8, 128), seed: int = 0, vocab: tuple[int, int] = (100, 30000),
                slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None,
                timeout: float = 600.0, max_concurrency: int | None = None,
                workload: list[tuple[list[int], int]] | None = None) -> dict[str, Any]:
    """Run the load and return the summary (latency percentiles, throughputs, goodput, and each request's
    latencies under ``"per_request"``). ``workload`` gives the requests as ``(prompt ids, output length)``
    instead of random ones (``num_requests`` is then its length).

    Every request is counted once, as completed or failed (with its error), never dropped.
    """
    if workload is not None:
        if not workload:
            raise LabkitError("workload is empty: give at least one (prompt ids, output length) pair")
        num_requests = len(workload)
    if not isinstance(num_requests, int) or num_requests < 1:
        raise LabkitError(f"num_requests={num_requests!r} must be a positive integer")
    if not (request_rate > 0) or (math.isnan(request_rate)):
        raise LabkitError(f"request_rate={request_rate} must be > 0 (use inf for all at once)")
    prompt_len, output_len = _check_range("prompt_len", prompt_len), _check_range("output_len", output_len)
    if max_concurrency is not None and max_concurrency < 1:
        raise LabkitError(f"max_concurrency={max_concurrency} must be a positive integer or None")
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise LabkitError(f"url={url!r} must look like http://HOST:PORT")
    base = url.rstrip("/")
    model = model or _model_name(base, timeout=min(timeout, 30.0))
    rng = random.Random(seed)
    work = workload or [([rng.randint(*vocab) for _ in range(rng.randint(*prompt_len))], rng.randint(*output_len))
                        for _ in range(num_requests)]
    delays, t = [], 0.0
    for _ in work:
        delays.append(t)
        if request_rate != float("inf"):
            t += rng.expovariate(request_rate)
    results, duration = _run_coroutine(_run_load(base, model, work, delays, timeout, max_concurrency))
    return summarize_results(results, duration, slo_ttft_ms, slo_tpot_ms,
                             config=dict(url=url, model=model, num_requests=num_requests, request_rate=request_rate,
                                         prompt_len=list(prompt_len), output_len=list(output_len), seed=seed,
                                         max_concurrency=max_concurrency))


def _run_coroutine(coro):
    """``asyncio.run`` — in a worker thread when this thread already runs an event loop (Jupyter does)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _run_load(base: str, model: str, work: list, delays: list[float], timeout: float,
                    max_concurrency: int | None) -> tuple[list[RequestResult], float]:
    import httpx

    limit = asyncio.Semaphore(max_concurrency or len(work))
    limits = httpx.Limits(max_connections=max_concurrency or len(work), max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:
        start = time.perf_counter()

        async def one(i: int) -> RequestResult:
            await asyncio.sleep(max(0.0, start + delays[i] - time.perf_counter()))
            async with limit:
                return await _stream_one(client, base, model, *work[i])

        results = await asyncio.gather(*(one(i) for i in range(len(work))))
    return list(results), time.perf_counter() - start


def summarize_results(results: list[RequestResult], duration_s: float, slo_ttft_ms: float | None = None,
                      slo_tpot_ms: float | None = None, config: dict | None = None) -> dict[str, Any]:
    ok = [r for r in results if r.error is None]
    out: dict[str, Any] = {"config": config or {}, "requests": len(results), "completed": len(ok),
                           "failed": len(results) - len(ok),
                           "duration_s": duration_s, "request_throughput": len(ok) / duration_s,
                           "output_token_throughput": sum(r.output_len for r in ok) / duration_s,
                           "errors": sorted({r.error for r in results if r.error})[:5]}
    series = {"ttft": [r.ttft_s for r in ok if r.ttft_s is not None],
              "tpot": [r.tpot_s for r in ok if r.tpot_s is not None],
              "itl": [x for r in ok for x in r.itl_s], "e2e": [r.e2e_s for r in ok if r.e2e_s is not None]}
    for name, vals in series.items():
        ms = [v * 1e3 for v in vals]
        out[f"{name}_ms_mean"] = sum(ms) / len(ms) if ms else None
        out[f"{name}_ms_p50"] = measure.percentile(ms, 50)
        out[f"{name}_ms_p99"] = measure.percentile(ms, 99)
    good = [r for r in ok if (slo_ttft_ms is None or (r.ttft_s or 0) * 1e3 <= slo_ttft_ms)
            and (slo_tpot_ms is None or (r.tpot_s or 0) * 1e3 <= slo_tpot_ms)]
    out["goodput_requests_per_s"] = len(good) / duration_s
    out["slo"] = {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms}
    ms = lambda v: None if v is None else v * 1e3  # noqa: E731
    out["per_request"] = [{"ttft_ms": ms(r.ttft_s), "tpot_ms": ms(r.tpot_s), "e2e_ms": ms(r.e2e_s),
                           "output_len": r.output_len, "error": r.error} for r in results]
    return out


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"completed {s['completed']} (failed {s['failed']}) in {s['duration_s']:.1f} s",
             f"request throughput   {s['request_throughput']:.2f} req/s",
             f"output throughput    {s['output_token_throughput']:.1f} tok/s",
             f"goodput              {s['goodput_requests_per_s']:.2f} req/s under SLO {s['slo']}"]
    for name in ("ttft", "tpot", "itl", "e2e"):
        if s[f"{name}_ms_p50"] is not None:
            lines.append(f"{name.upper():5s} ms  mean {s[f'{name}_ms_mean']:9.1f}  p50 {s[f'{name}_ms_p50']:9.1f}  "
                         f"p99 {s[f'{name}_ms_p99']:9.1f}")
    if s["errors"]:
        lines.append("errors: " + "; ".join(s["errors"]))
    return "\n".join(lines)


def main_from_args(args) -> None:
    out = check_out_path(args.out)
    summary = bench_serve(args.url, model=args.model, num_requests=args.num_requests, request_rate=args.request_rate,
                          prompt_len=tuple(args.prompt_len), output_len=tuple(args.output_len), seed=args.seed,
                          slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms,
                          max_concurrency=args.max_concurrency)
    print(format_summary(summary))
    if out is not None:
        atomic_write_text(out, json.dumps(summary, indent=2) + "\n")
        print(f"wrote {out}")


