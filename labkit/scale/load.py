"""One engine under growing load: a sweep of Poisson arrival rates with the same requests at each, goodput under
an SLO (vLLM's benchmark and DistServe's definition: requests per second that meet every latency target), the knee
where goodput stops following the offered rate, and Little's law checked on the server's own in-flight gauge."""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from dataclasses import dataclass, field

from labkit import LabkitError


@dataclass(frozen=True)
class SLO:
    """Latency targets a request must meet to count toward goodput (None: no target on that measure)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tpot_ms"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and v > 0):
                raise LabkitError(f"{name}={v!r} must be a positive number of milliseconds or None")

    def met(self, ttft_ms: float | None, tpot_ms: float | None) -> bool:
        """Whether one request's latencies meet every target (a missing measure meets no target that is set)."""
        return ((self.ttft_ms is None or (ttft_ms is not None and ttft_ms <= self.ttft_ms))
                and (self.tpot_ms is None or (tpot_ms is not None and tpot_ms <= self.tpot_ms)))


def default_slo(ttft_ms_alone: float, tpot_ms_alone: float, slack: float = 5.0) -> SLO:
    """SLO from the one-request latencies: ``slack`` × what the engine does with nothing else to do. A target
    below the unloaded latency can never be met; a few times above it is what chat serving allows (the lesson
    says why 5: batching costs each request some TPOT, queueing costs TTFT first)."""
    if slack < 1:
        raise LabkitError(f"slack={slack!r} must be at least 1 (an SLO tighter than the unloaded latency fails "
                          "every request)")
    return SLO(round(slack * ttft_ms_alone, 1), round(slack * tpot_ms_alone, 1))


def within(requests: list[dict], slo: SLO) -> int:
    """How many of ``requests`` completed (no ``error``) and met every target of ``slo``."""
    return sum(1 for r in requests if r.get("error") is None and slo.met(r.get("ttft_ms"), r.get("tpot_ms")))


def goodput(requests: list[dict], duration_s: float, ttft_ms: float | None = None,
            tpot_ms: float | None = None) -> float:
    """Requests per second that completed and met every latency target (``requests``: dicts with ``ttft_ms``,
    ``tpot_ms`` and ``error``, as ``bench_serve``'s ``per_request``); a failed request never counts, and a target
    that is None is no target."""
    if not duration_s > 0:
        raise LabkitError(f"duration_s={duration_s!r} must be positive")
    return within(requests, SLO(ttft_ms, tpot_ms)) / duration_s


def attainment(requests: list[dict], ttft_ms: float | None = None, tpot_ms: float | None = None) -> float:
    """The share of all requests sent (failed ones included) that completed within every latency target."""
    if not requests:
        raise LabkitError("requests is empty: attainment needs at least one request")
    return within(requests, SLO(ttft_ms, tpot_ms)) / len(requests)


def knee(rates: list[float], attainments: list[float], keep: float = 0.9) -> float | None:
    """The highest offered rate up to which at least ``keep`` of the requests meet the SLO (at it and at every
    lower rate): DistServe's goodput of a deployment, with its 90 % attainment goal. None when even the lowest
    rate misses it. Past the knee, more load buys latency, not served requests."""
    if len(rates) != len(attainments) or not rates:
        raise LabkitError(f"rates ({len(rates)}) and attainments ({len(attainments)}) must be non-empty and "
                          "equally long")
    if sorted(rates) != list(rates):
        raise LabkitError(f"rates={rates!r} must be in increasing order")
    best = None
    for r, a in zip(rates, attainments):
        if a < keep:
            break
        best = r
    return best


def knee_sentence(rates: list[float], goodputs: list[float], attainments: list[float], p99_ttft_ms: list[float],
                  slo: SLO, keep: float = 0.9) -> str:
    """The sentence the lesson prints about the sweep, computed from it."""
    k = knee(rates, attainments, keep)
    peak = max(range(len(rates)), key=lambda i: goodputs[i])
    slo_text = f"TTFT ≤ {slo.ttft_ms:g} ms and TPOT ≤ {slo.tpot_ms:g} ms"
    most = f"The most goodput measured was {goodputs[peak]:.2f} req/s, at {rates[peak]:g} req/s offered."
    if k is None:
        return (f"Even at {rates[0]:g} req/s only {100 * attainments[0]:.0f} % of requests met {slo_text} "
                f"(the goal: {100 * keep:.0f} %). {most}")
    if k == rates[-1]:
        return (f"At every rate tried, up to {k:g} req/s, at least {100 * keep:.0f} % of requests met {slo_text}: "
                f"the knee lies beyond; sweep higher. {most}")
    i = rates.index(k)
    return (f"The knee is at {k:g} req/s: up to it at least {100 * keep:.0f} % of requests met {slo_text}; at "
            f"{rates[i + 1]:g} req/s only {100 * attainments[i + 1]:.0f} % did, and p99 TTFT grew from "
            f"{p99_ttft_ms[i]:,.0f} to {p99_ttft_ms[i + 1]:,.0f} ms. {most}")


def littles_law(in_system: list[float], arrival_rate: float, mean_latency_s: float) -> dict[str, float]:
    """Little's law, L = λ·W, on measurements: ``in_system`` samples of the server's in-flight gauge taken at
    even intervals over the run, against the arrival rate × the mean time a request spends in the system."""
    if not in_system:
        raise LabkitError("in_system has no samples: sample the server's /metrics during the run")
    measured = sum(in_system) / len(in_system)
    predicted = arrival_rate * mean_latency_s
    return {"L_measured": measured, "L_predicted": predicted,
            "ratio": measured / predicted if predicted else float("nan")}


def metric(metrics_text: str, name: str) -> float:
    """The value of one metric (gauge, or counter as ``NAME_total``) in a Prometheus /metrics answer."""
    m = re.search(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.eE+-]+|NaN)$", metrics_text, re.M)
    if m is None:
        raise LabkitError(f"{name} is not in this /metrics answer (not a labkit server?)")
    return float(m.group(1))


def in_flight(metrics_text: str) -> float:
    """The in-flight gauge's value in a /metrics answer."""
    return metric(metrics_text, "labkit:num_requests_in_flight")


@dataclass
class MetricsSampler:
    """Reads a server's in-flight gauge every ``interval_s`` in a thread, while the ``with`` block runs."""

    url: str
    interval_s: float = 0.05
    samples: list[tuple[float, float]] = field(default_factory=list)

    def __enter__(self) -> MetricsSampler:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="labkit-metrics-sampler")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url.rstrip("/") + "/metrics", timeout=5) as resp:
                    self.samples.append((t, in_flight(resp.read().decode())))
            except OSError:
                pass  # a missed scrape is a missing sample, not a failed run
            self._stop.wait(max(0.0, self.interval_s - (time.perf_counter() - t)))

    def between(self, start: float, end: float) -> list[float]:
        """The samples taken in ``[start, end]`` (``time.perf_counter`` times)."""
        return [v for t, v in self.samples if start <= t <= end]
