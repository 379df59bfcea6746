"""What every checker shares: the mismatch it raises, the verdict it returns, and tensor comparison in words."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch


class Mismatch(Exception):
    """The learner's function disagrees with the kit's; the message says where and how."""


T = TypeVar("T")


@dataclass
class Cases:
    """Which of a checker's cases ran, and which failed: partial points are the share that pass."""

    total: int = 0
    failed: set[int] = field(default_factory=set)
    current: int | None = None


_CASES: contextvars.ContextVar[Cases | None] = contextvars.ContextVar("labkit_exercise_cases", default=None)
_INPUTS: contextvars.ContextVar[int] = contextvars.ContextVar("labkit_exercise_inputs", default=0)


@contextlib.contextmanager
def other_inputs(inputs: int) -> Iterator[None]:
    """Checkers inside draw their random inputs from other seeds (0: the ones the notebook shows). The shapes and
    the edge cases stay: this is how a grader's hidden cases differ from the notebook's."""
    token = _INPUTS.set(inputs)
    try:
        yield
    finally:
        _INPUTS.reset(token)


def each(cases: Iterable[T]) -> Iterator[T]:
    """A checker's cases, one at a time (``for label, x in each(cases):``). On its own it yields them all; under
    :func:`score` it skips cases that already failed and remembers which one is running, so a failure can be
    pinned to its case and the checker run again on the others."""
    state = _CASES.get()
    for i, case in enumerate(cases):
        if state is not None:
            state.total = max(state.total, i + 1)
            if i in state.failed:
                continue
            state.current = i
        yield case
    if state is not None:
        state.current = None


def score(checker: Any, fn: Any) -> tuple[str, Cases, BaseException | None]:
    """Run ``checker(fn)`` until every case it tries through :func:`each` has passed or failed once: returns the
    message of the last run that passed (or ""), the cases, and the first failure (None: all passed). A failure
    outside any case fails the whole exercise: it is re-raised."""
    state, first = Cases(), None
    token = _CASES.set(state)
    try:
        while True:
            try:
                return checker(fn), state, first
            except Exception as exc:
                if state.current is None or state.current in state.failed:
                    if first is None:
                        raise
                    raise first from exc
                state.failed.add(state.current)
                state.current, first = None, first or exc
                if len(state.failed) >= state.total:
                    return "", state, first
    finally:
        _CASES.reset(token)


@dataclass
class Verdict:
    name: str
    ok: bool
    message: str
    fallback: bool  # True when the notebook goes on with the kit's version
    points: float = 0.0  # what a grader gives: max_points when ok, else 0 (labkit grade)
    max_points: float = 1.0

    def __post_init__(self) -> None:
        if self.ok and not self.points:
            self.points = self.max_points

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "ok": self.ok, "points": self.points, "max_points": self.max_points,
                "message": self.message}


def close(got: Any, want: torch.Tensor, what: str, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    if not isinstance(got, torch.Tensor):
        raise Mismatch(f"{what}: expected a tensor, got {type(got).__name__}")
    if tuple(got.shape) != tuple(want.shape):
        raise Mismatch(f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    diff = (got.float() - want.float()).abs()
    bad = diff > atol + rtol * want.float().abs()
    if bad.any():
        i = tuple(int(v) for v in bad.nonzero()[0])
        raise Mismatch(f"{what}: at index {i} you give {got[i].item():.6g}, the kit gives {want[i].item():.6g} "
                       f"({int(bad.sum())} of {bad.numel()} values differ)")


def gen(seed: int) -> torch.Generator:
    """A checker's random inputs: seed ``seed`` in the notebook, another one under :func:`other_inputs`."""
    return torch.Generator().manual_seed(seed + 1_000_003 * _INPUTS.get())
