"""Capacity and cost from a measured record: how many replicas a target load needs at an SLO, and what a million
output tokens costs at that utilization. Prices are the caller's input: a price list changes, a record does not."""

from __future__ import annotations

import math

from labkit import LabkitError
from labkit.results import Record
from labkit.scale.load import goodput


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise LabkitError(f"{name}={value!r} must be a positive number")
    return float(value)


def plan(record: Record, target_rps: float, price_per_hour: float, ttft_ms: float | None = None,
         tpot_ms: float | None = None) -> dict:
    """Replicas for ``target_rps`` requests/s within the SLO (``ttft_ms``, ``tpot_ms``; default the record's),
    from the best goodput one replica reached in the record's rate sweep (recomputed from each request's
    latencies when the SLO differs), and the cost per million output tokens at ``price_per_hour`` a replica.

    One replica's goodput is the capacity a replica can promise; replicas = ceil(target / it) (routing is assumed
    even: the record's replica rows say how far from even a real router is)."""
    target_rps, price_per_hour = _positive("target_rps", target_rps), _positive("price_per_hour", price_per_hour)
    slo = record.config.get("slo") or {}
    ttft_ms = slo.get("ttft_ms") if ttft_ms is None else _positive("ttft_ms", ttft_ms)
    tpot_ms = slo.get("tpot_ms") if tpot_ms is None else _positive("tpot_ms", tpot_ms)
    sweep = [v for v in record.variants if v["name"].startswith("rate-")]
    if not sweep:
        raise LabkitError(f"record {record.experiment!r} has no rate sweep (rows named rate-*): plan needs "
                          "`labkit run scale`'s record")
    best = max(sweep, key=lambda v: _goodput(v, ttft_ms, tpot_ms, slo))
    per_replica = _goodput(best, ttft_ms, tpot_ms, slo)
    if per_replica <= 0:
        raise LabkitError(f"no rate of the sweep met TTFT ≤ {ttft_ms} ms and TPOT ≤ {tpot_ms} ms: one replica "
                          "cannot serve this SLO at any load; relax it or make each request faster")
    replicas = math.ceil(target_rps / per_replica - 1e-9)
    tokens_per_request = best["output_tokens_per_s"] / best["offered_rps"] if best.get("offered_rps") else None
    tokens_per_hour = target_rps * 3600 * tokens_per_request if tokens_per_request else None
    return {"replicas": replicas, "goodput_per_replica_rps": per_replica, "at_offered_rps": best["offered_rps"],
            "utilization": target_rps / (replicas * per_replica), "slo": {"ttft_ms": ttft_ms, "tpot_ms": tpot_ms},
            "cost_per_hour": replicas * price_per_hour,
            "cost_per_million_output_tokens": (replicas * price_per_hour / tokens_per_hour * 1e6
                                               if tokens_per_hour else None)}


def _goodput(row: dict, ttft_ms, tpot_ms, slo: dict) -> float:
    """A sweep row's goodput under the SLO asked: the stored median when it is the record's own SLO, else
    recomputed from the requests of the median run."""
    if (ttft_ms, tpot_ms) == (slo.get("ttft_ms"), slo.get("tpot_ms")):
        return row["goodput_rps"]
    runs = row.get("requests_runs")
    if not runs:
        raise LabkitError("this record keeps no per-request latencies (requests_runs): plan can use only its own "
                          f"SLO, TTFT ≤ {slo.get('ttft_ms')} ms and TPOT ≤ {slo.get('tpot_ms')} ms")
    values = sorted(goodput(r["per_request"], r["duration_s"], ttft_ms, tpot_ms) for r in runs)
    return values[len(values) // 2]
