"""Notebook 00: timing a function honestly (warm-up, repeats, the median)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from labkit.exercises._check import Mismatch, each

NOTEBOOK = "00"


def kit_time_fn(fn: Callable[[], Any], warmup: int = 2, repeats: int = 5) -> float:
    """Median seconds of ``repeats`` calls after ``warmup`` untimed calls: what :func:`labkit.measure.benchmark`
    (``torch.utils.benchmark``, synchronising the GPU around each call) measures for every experiment."""
    from labkit import measure

    device = "cuda" if torch.cuda.is_available() else None
    return measure.benchmark(fn, warmup=warmup, repeats=repeats, device=device).median_s


def _timed_workload(cold_calls: int, cold_s: float, hiccup_call: int | None) -> tuple[Callable[[], None], dict]:
    """A call that sleeps ``cold_s`` for its first ``cold_calls`` calls, 60 ms on call ``hiccup_call``, else 4 ms."""
    calls = {"n": 0}

    def workload() -> None:
        calls["n"] += 1
        n = calls["n"]
        time.sleep(cold_s if n <= cold_calls else 0.06 if n == hiccup_call else 0.004)

    return workload, calls


def _check_timing(fn: Callable) -> str:
    # Two rounds, each catching what the other cannot: one slow repeat among the timed calls (the mean moves, the
    # median does not), then more cold calls than timed ones (a median over *all* calls lands on a cold one).
    rounds = [(2, 5, 0.08, 5, "one timed call took 60 ms: take the median of the repeats, not the mean"),
              (4, 3, 0.05, None, "the 4 cold-start calls got in: time only after the warm-up calls")]
    got = 0.0
    for warmup, repeats, cold_s, hiccup, hint in each(rounds):
        workload, calls = _timed_workload(warmup, cold_s, hiccup)
        got = fn(workload, warmup=warmup, repeats=repeats)
        if not isinstance(got, (int, float)) or isinstance(got, bool):
            raise Mismatch(f"return the time in seconds as a float, not {type(got).__name__}")
        if calls["n"] < warmup + repeats:  # more is allowed: torch.utils.benchmark warms each measurement too
            raise Mismatch(f"with warmup={warmup} and repeats={repeats} the workload should run at least "
                           f"{warmup + repeats} times; yours ran it {calls['n']} times")
        if got > 0.009:
            raise Mismatch(f"warmup={warmup}, repeats={repeats}: you measured {got * 1e3:.1f} ms for a ~4 ms call "
                           f"— {hint}")
        if got < 0.003:
            raise Mismatch(f"you measured {got * 1e3:.2f} ms for a call that sleeps 4 ms: is the clock read around "
                           "fn()?")
    return f"median {got * 1e3:.1f} ms for a 4 ms call, cold start and outlier ignored"


# name: (the kit's function, its checker)
EXERCISES = {"time_fn": (kit_time_fn, _check_timing)}
