"""The learner's turn: write the core function, and a check answers at once.

``check(name, fn)`` runs ``fn`` against the kit's own implementation on seeded random inputs (the shapes and
dtypes that matter, and edge cases: a constant row, a partial last block, a single row), prints ✓ or the
first difference in words, and returns the function the notebook should go on with: the learner's when it
passes, else the kit's (so a workshop never blocks on an empty or wrong exercise). A stub that still raises
``NotImplementedError`` is reported as such. ``available()`` lists the exercises; solutions live in the kit.

Each technique folder holds its lesson's ``exercise`` module (``labkit/quant/exercise.py`` for notebook 01, …;
``export`` holds two, ``exercise_onnx`` and ``exercise_compilers``), each with its ``NOTEBOOK`` and
``EXERCISES = {name: (the kit's function, checker)}``; this registry finds them (:mod:`labkit.techniques`), so a new
lesson's exercises are a new module in its folder.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import json
import os
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path

from labkit import LabkitError, techniques
from labkit.exercises._check import Mismatch, Verdict, other_inputs, score

__all__ = ["Mismatch", "Verdict", "available", "check", "notebook_of", "of_lesson", "solution", "solution_files",
           "verify"]


@cache
def _registry() -> dict[str, tuple[str, Callable, Callable]]:
    """name -> (notebook, the kit's function, checker), over every lesson module, in notebook order."""
    found = []
    for dotted in techniques.modules("exercise"):
        mod = importlib.import_module(dotted)
        found += [(mod.NOTEBOOK, name, kit, checker) for name, (kit, checker) in mod.EXERCISES.items()]
    return {name: (nb, kit, checker) for nb, name, kit, checker in sorted(found, key=lambda e: e[0])}


def available(notebook: str | None = None) -> list[str]:
    """Exercise names (of one notebook, e.g. ``"01"``, or all)."""
    return [n for n, (nb, _, _) in _registry().items() if notebook is None or nb == notebook]


def of_lesson(lesson: str | None) -> list[str]:
    """The exercises of ``lesson`` (``"01b"``, ...; None: all), or a LabkitError naming the lessons that have some."""
    names = available(lesson)
    if not names:
        known = sorted({notebook_of(n) for n in available()})
        raise LabkitError(f"lesson={lesson!r} has no exercises; lessons with exercises: {', '.join(known)}")
    return names


def solution_files() -> list[Path]:
    """Every file the kit's solutions can be read from: each exercise module's source and its cached bytecode
    (``labkit grade`` refuses reading them while a learner's notebook runs)."""
    files = []
    for dotted in techniques.modules("exercise"):
        source = Path(importlib.import_module(dotted).__file__).resolve()
        files += [source, Path(importlib.util.cache_from_source(str(source)))]
    return files


def notebook_of(name: str) -> str:
    """The lesson an exercise belongs to ("01", ...)."""
    return _entry(name)[0]


def solution(name: str) -> Callable:
    """The kit's own function for an exercise."""
    return _entry(name)[1]


def _entry(name: str) -> tuple[str, Callable, Callable]:
    if name not in _registry():
        raise LabkitError(f"exercise name={name!r} does not exist; available: {', '.join(_registry())}")
    return _registry()[name]


def verify(name: str, fn: Callable, inputs: int = 0, *, own_work: bool = False) -> Verdict:
    """Run the checker without printing: ``Verdict(ok, message, fallback, points, max_points)``. A checker that
    walks its cases through ``each`` gives partial points (the share of cases right); the message is the first
    failure's. ``inputs``: 0 checks on the random inputs the notebook's check uses; another number draws others
    of the same shapes (a grader's hidden cases). ``own_work=True`` (grading) fails a function that calls the kit's
    own solution while it runs, however it is wrapped."""
    _, kit, checker = _entry(name)
    if not (isinstance(inputs, int) and inputs >= 0):
        raise LabkitError(f"inputs={inputs!r} must be a whole number >= 0 (0: the notebook's own inputs)")
    watch = _SolutionWatch(kit) if own_work else None
    try:
        with other_inputs(inputs):
            message, cases, first = score(checker, watch.wrap(fn) if watch else fn)
    except Exception as exc:  # noqa: BLE001 - a learner's bug is reported, never a crash of the notebook
        return Verdict(name, False, _said(exc), fallback=True)
    finally:
        if watch:
            watch.close()
    if watch and watch.caught:
        return Verdict(name, False, "it calls the kit's own function (labkit.exercises.solution) while it runs: "
                                    "the work must be yours", fallback=True)
    if first is None:
        return Verdict(name, True, message, fallback=False)
    right = cases.total - len(cases.failed)
    what = _said(first)
    return Verdict(name, False, f"{what} ({right} of {cases.total} cases right)" if right else what,
                   fallback=True, points=round(right / cases.total, 3))


class _SolutionWatch:
    """Notices a call into the kit's solution made from inside the learner's function (the checker's own calls to
    it, outside the learner's function, do not count): a profile hook, set only while grading."""

    def __init__(self, kit: Callable) -> None:
        self.code = getattr(inspect.unwrap(kit), "__code__", None)
        self.depth, self.caught = 0, False
        self._previous = sys.getprofile()
        if self.code is not None:
            sys.setprofile(self._hook)

    def _hook(self, frame, event, arg) -> None:
        if event == "call" and self.depth and frame.f_code is self.code:
            self.caught = True

    def wrap(self, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def learners(*args, **kwargs):
            self.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
        return learners

    def close(self) -> None:
        if self.code is not None:
            sys.setprofile(self._previous)


def _said(exc: BaseException) -> str:
    """What a failed check tells the learner."""
    if isinstance(exc, NotImplementedError):
        return "not written yet (the stub raises NotImplementedError)"
    if isinstance(exc, Mismatch):
        return str(exc)
    return f"your function raised {type(exc).__name__}: {exc}"


GRADE_LOG = "LABKIT_GRADE_LOG"  # set by `labkit grade`: every check appends its verdict to this file


def check(name: str, fn: Callable) -> Callable:
    """Check a learner's function, print ✓ or what differs, and return the function to go on with. Under
    ``labkit grade`` the verdict is also appended, as one JSON line, to the file ``$LABKIT_GRADE_LOG`` names."""
    grading = bool(os.environ.get(GRADE_LOG))
    v = verify(name, fn, own_work=grading)
    if grading:
        if fn is solution(name):  # e.g. `f = exercises.solution(...)`: the kit's work, not the learner's
            v = Verdict(name, False, "this is the kit's own function (exercises.solution), not yours", fallback=True)
        with open(os.environ[GRADE_LOG], "a", encoding="utf-8") as log:
            log.write(json.dumps(v.as_dict()) + "\n")
    if v.ok:
        print(f"✓ {name}: {v.message}")
        return fn
    print(f"✗ {name}: {v.message}\n  → the notebook goes on with the kit's version "
          f"(labkit.exercises.solution({name!r})); fix yours and run this cell again.")
    return solution(name)
