"""Notebook 06c: goodput, the requests per second that meet a latency SLO, checked against
``labkit.scale.load.goodput``."""

from __future__ import annotations

import random
from collections.abc import Callable

from labkit.exercises._check import Mismatch, each
from labkit.scale.load import goodput

NOTEBOOK = "06c"


def _requests(n: int, seed: int, failed: float = 0.1) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        bad = rng.random() < failed
        out.append({"ttft_ms": None if bad else rng.uniform(20, 2000), "tpot_ms": None if bad else rng.uniform(5, 200),
                    "e2e_ms": None if bad else rng.uniform(100, 9000), "error": "HTTP 503" if bad else None})
    return out


def _check_goodput(fn: Callable) -> str:
    load = _requests(200, 3)
    one_token = [{"ttft_ms": 50.0, "tpot_ms": None, "e2e_ms": 50.0, "error": None}]  # TPOT needs two tokens
    cases = [("a TTFT and a TPOT target", load, 30.0, 500.0, 100.0),
             ("a TTFT target alone", load, 30.0, 500.0, None), ("a TPOT target alone", load, 30.0, None, 100.0),
             ("no target: every completed request counts", load, 30.0, None, None),
             ("targets nobody meets", load, 30.0, 1.0, 1.0),
             ("a failed request never counts", [{**load[0], "error": "HTTP 503"}] * 3, 2.0, None, None),
             ("a one-token answer has no TPOT to meet a TPOT target", one_token, 1.0, 100.0, 10.0),
             ("a one-token answer without a TPOT target", one_token, 1.0, 100.0, None)]
    for label, reqs, duration, ttft, tpot in each(cases):
        got = fn(reqs, duration, ttft, tpot)
        want = goodput(reqs, duration, ttft, tpot)
        if not isinstance(got, (int, float)):
            raise Mismatch(f"{label}: return a number of requests per second; yours is {type(got).__name__}")
        if abs(got - want) > 1e-9:
            raise Mismatch(f"{label}: {got:.4g} req/s, expected {want:.4g} (count the requests with no error whose "
                           "TTFT and TPOT are at or under each target that is set, then divide by the duration)")
    return (f"goodput as the kit's; on the 200-request load: {goodput(load, 30.0):.2f} req/s completed, "
            f"{goodput(load, 30.0, 500.0, 100.0):.2f} within TTFT ≤ 500 ms and TPOT ≤ 100 ms")


# name: (the kit's function, its checker)
EXERCISES = {"goodput": (goodput, _check_goodput)}
