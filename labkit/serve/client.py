"""``labkit bench-serve``: a load generator for any OpenAI-compatible server (labkit's, vLLM, TGI ...).

Requests arrive as a Poisson process at ``request_rate`` per second (``inf``: all at once), with seeded
random prompt and output lengths. Prompts are token-id lists (the OpenAI API accepts them) so lengths are
exact; ``ignore_eos`` makes each request produce exactly its output length on servers that support it
(labkit, vLLM). Each request streams, so we time the first token (TTFT), the gaps between tokens (ITL), the
time per output token after the first (TPOT) and the whole request (E2E).
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labkit import LabkitError
from labkit.serve.bench import percentile


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


def _stream_one(url: urllib.parse.ParseResult, model: str, prompt: list[int], max_tokens: int,
                timeout: float) -> RequestResult:
    res = RequestResult(prompt_len=len(prompt))
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                       "stream": True, "ignore_eos": True})
    conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=timeout)
    start = last = time.perf_counter()
    try:
        conn.request("POST", url.path.rstrip("/") + "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            res.error = f"HTTP {resp.status}: {resp.read()[:200]!r}"
            return res
        while line := resp.readline():
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            if line == b"data: [DONE]":
                break
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if res.ttft_s is None:
                res.ttft_s = now - start
            else:
                res.itl_s.append(now - last)
            last = now
            res.output_len += 1
            usage = chunk.get("usage")
            if usage:
                res.output_len = usage["completion_tokens"]
        res.e2e_s = time.perf_counter() - start
    except OSError as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    return res


def _model_name(url: urllib.parse.ParseResult, timeout: float) -> str:
    conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=timeout)
    try:
        conn.request("GET", url.path.rstrip("/") + "/v1/models")
        return json.loads(conn.getresponse().read())["data"][0]["id"]
    except (OSError, KeyError, IndexError, ValueError) as exc:
        raise LabkitError(f"no OpenAI-compatible server answers at {url.geturl()} ({exc})") from None
    finally:
        conn.close()


def bench_serve(url: str = "http://127.0.0.1:8000", *, model: str | None = None, num_requests: int = 32,
                request_rate: float = float("inf"), prompt_len: tuple[int, int] = (16, 256),
                output_len: tuple[int, int] = (8, 128), seed: int = 0, vocab: tuple[int, int] = (100, 30000),
                slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None,
                timeout: float = 600.0) -> dict[str, Any]:
    """Run the load and return the summary (latency percentiles, throughputs, goodput)."""
    if num_requests < 1:
        raise LabkitError(f"num_requests={num_requests} must be at least 1")
    if not request_rate > 0:
        raise LabkitError(f"request_rate={request_rate} must be > 0 (use inf for all at once)")
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme != "http" or not parsed.hostname:
        raise LabkitError(f"url={url!r} must look like http://HOST:PORT")
    model = model or _model_name(parsed, timeout)
    rng = random.Random(seed)
    work = [([rng.randint(*vocab) for _ in range(rng.randint(*prompt_len))], rng.randint(*output_len))
            for _ in range(num_requests)]
    delays, t = [], 0.0
    for _ in work:
        delays.append(t)
        if request_rate != float("inf"):
            t += rng.expovariate(request_rate)
    results: list[RequestResult | None] = [None] * num_requests

    def worker(i: int) -> None:
        time.sleep(max(0.0, start + delays[i] - time.perf_counter()))
        results[i] = _stream_one(parsed, model, work[i][0], work[i][1], timeout)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(num_requests)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return summarize_results([r for r in results if r is not None], time.perf_counter() - start,
                             slo_ttft_ms, slo_tpot_ms, config=dict(url=url, model=model, num_requests=num_requests,
                                                                   request_rate=request_rate, seed=seed))


def summarize_results(results: list[RequestResult], duration_s: float, slo_ttft_ms: float | None = None,
                      slo_tpot_ms: float | None = None, config: dict | None = None) -> dict[str, Any]:
    ok = [r for r in results if r.error is None]
    out: dict[str, Any] = {"config": config or {}, "completed": len(ok), "failed": len(results) - len(ok),
                           "duration_s": duration_s, "request_throughput": len(ok) / duration_s,
                           "output_token_throughput": sum(r.output_len for r in ok) / duration_s,
                           "errors": sorted({r.error for r in results if r.error})[:5]}
    series = {"ttft": [r.ttft_s for r in ok if r.ttft_s is not None],
              "tpot": [r.tpot_s for r in ok if r.tpot_s is not None],
              "itl": [x for r in ok for x in r.itl_s], "e2e": [r.e2e_s for r in ok if r.e2e_s is not None]}
    for name, vals in series.items():
        ms = [v * 1e3 for v in vals]
        out[f"{name}_ms_mean"] = sum(ms) / len(ms) if ms else None
        out[f"{name}_ms_p50"] = percentile(ms, 50)
        out[f"{name}_ms_p99"] = percentile(ms, 99)
    good = [r for r in ok if (slo_ttft_ms is None or (r.ttft_s or 0) * 1e3 <= slo_ttft_ms)
            and (slo_tpot_ms is None or (r.tpot_s or 0) * 1e3 <= slo_tpot_ms)]
    out["goodput_requests_per_s"] = len(good) / duration_s
    out["slo"] = {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms}
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
    summary = bench_serve(args.url, model=args.model, num_requests=args.num_requests, request_rate=args.request_rate,
                          prompt_len=tuple(args.prompt_len), output_len=tuple(args.output_len), seed=args.seed,
                          slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms)
    print(format_summary(summary))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))


