"""Notebook 07: the decision rule, checked against ``labkit.select``."""

from __future__ import annotations

from collections.abc import Callable

from labkit.exercises._check import Mismatch, each

NOTEBOOK = "07"


def _kit_choose(rows: list[dict], within: float, baseline: str = "dense") -> str:
    """The name of the smallest (``weight_bytes``) variant whose accuracy is at most ``within`` below the row
    named ``baseline``; among equal sizes, the more accurate one."""
    from labkit import select

    tagged = [{**r, "model": "m"} for r in rows]
    return select.select(tagged, model="m", metric="accuracy", within=within, cost="weight_bytes",
                         baseline=baseline).variant["name"]


def _stage_rows(spec: list[tuple[str, float, int]]) -> list[dict]:
    return [{"name": n, "accuracy": a, "weight_bytes": b} for n, a, b in spec]


def _check_choose(fn: Callable) -> str:
    cases = [
        ("the smallest variant loses too much", 0.015, [("dense", 0.975, 86_000), ("pruned", 0.968, 40_000),
                                                        ("int8", 0.964, 12_000), ("tiny", 0.90, 3_000)]),
        ("a loss exactly at the limit is allowed (>=, not >)", 0.25, [("dense", 0.5, 100), ("a", 0.25, 50),
                                                                      ("b", 0.125, 20)]),
        ("equal sizes: the more accurate wins", 0.05, [("dense", 0.9, 100), ("x", 0.86, 40), ("y", 0.88, 40)]),
        ("nothing smaller qualifies: keep dense", 0.001, [("dense", 0.99, 100), ("q", 0.95, 10)]),
        ("better than dense is fine", 0.0, [("dense", 0.90, 100), ("distilled", 0.91, 30), ("z", 0.89, 5)]),
        ("rows in any order", 0.015, [("int8", 0.964, 12_000), ("tiny", 0.90, 3_000), ("dense", 0.975, 86_000),
                                      ("pruned", 0.968, 40_000)]),
        ("the baseline is the row named by baseline=", 0.02, [("teacher", 0.97, 90), ("dense", 0.99, 80),
                                                               ("student", 0.955, 40)]),
    ]
    for what, within, spec in each(cases):
        rows, base = _stage_rows(spec), "teacher" if "baseline=" in what else "dense"
        got, want = fn([dict(r) for r in rows], within, base), _kit_choose(rows, within, base)
        if got != want:
            raise Mismatch(f"{what} (within={within}, baseline={base!r}): you chose {got!r}, the kit chooses "
                           f"{want!r} — keep the variants with accuracy >= {base}'s - within, then take the smallest "
                           "weight_bytes "
                           "(on a tie in bytes, the more accurate)")
    return "the smallest variant within the allowed accuracy loss, as labkit.select chooses it"


# name: (the kit's function, its checker)
EXERCISES = {"choose": (_kit_choose, _check_choose)}
