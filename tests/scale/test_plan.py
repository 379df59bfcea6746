"""Capacity and cost from a sweep record."""

import pytest

from labkit.results import Record
from labkit.scale.plan import plan


def sweep_record() -> Record:
    rec = Record("scale", env={})
    rec.config["slo"] = {"ttft_ms": 600.0, "tpot_ms": 150.0}
    reqs = [{"ttft_ms": 100.0 * (i + 1), "tpot_ms": 40.0, "error": None} for i in range(8)]
    for rate, good in ((1.0, 1.0), (2.0, 1.9), (4.0, 1.2)):
        rec.add(f"rate-{rate:g}", offered_rps=rate, goodput_rps=good, output_tokens_per_s=20.0 * rate,
                requests_runs=[{"duration_s": 8 / rate, "per_request": reqs}])
    return rec


def test_replicas_and_cost_per_million_tokens():
    p = plan(sweep_record(), target_rps=10.0, price_per_hour=2.0)
    assert p["goodput_per_replica_rps"] == 1.9 and p["at_offered_rps"] == 2.0
    assert p["replicas"] == 6  # ceil(10 / 1.9)
    assert p["utilization"] == pytest.approx(10 / (6 * 1.9))
    assert p["cost_per_hour"] == 12.0
    # 20 output tokens a request: 10 req/s is 720,000 tokens an hour; $12 an hour is $16.67 a million
    assert p["cost_per_million_output_tokens"] == pytest.approx(12.0 / (10 * 3600 * 20) * 1e6)


def test_another_slo_is_recomputed_from_the_requests():
    p = plan(sweep_record(), target_rps=1.0, price_per_hour=1.0, ttft_ms=400.0, tpot_ms=150.0)
    # 4 of the 8 requests have TTFT <= 400 ms: best is rate 4 (duration 2 s): 2 req/s
    assert p["goodput_per_replica_rps"] == 2.0 and p["replicas"] == 1


@pytest.mark.parametrize("kwargs, match", [({"target_rps": 0}, "target_rps=0 must be a positive number"),
                                           ({"price_per_hour": -1}, "price_per_hour=-1 must be a positive"),
                                           ({"ttft_ms": 1.0, "tpot_ms": 1.0}, "cannot serve this SLO")])
def test_bad_plans_are_named(kwargs, match):
    args = {"target_rps": 5.0, "price_per_hour": 2.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        plan(sweep_record(), **args)


def test_a_record_without_a_sweep_is_refused():
    with pytest.raises(ValueError, match="no rate sweep"):
        plan(Record("serving", env={}), target_rps=1.0, price_per_hour=1.0)
