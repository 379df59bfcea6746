"""The kit's exercises as Otter-Grader tests: ``labkit export-otter DIR``.

Otter-Grader (https://otter-grader.readthedocs.io) grades a notebook by running it and then running each test
file in ``tests/`` against the notebook's globals. ``export`` writes one test file per exercise, in Otter's
exception-based format (``OK_FORMAT = False``, ``@test_case`` functions that raise on failure). Each file has two
cases: the random inputs the notebook's own check uses (visible), and inputs drawn from another seed (hidden), so
a function fitted to what the notebook printed does not pass. Both hand the notebook's global of the exercise's
name to the kit's checker (:func:`judge`). ``grader.check("pack_int4")`` in a notebook, ``otter check`` and
``otter run`` then use them as they use any Otter test.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from labkit import LabkitError, atomic, exercises

TEMPLATE = '''"""Otter-Grader test for labkit's exercise {name!r} (notebook {notebook}), written by `labkit export-otter`.

The learner's function is the notebook's global `{name}`; labkit's own checker judges it, on the notebook's
inputs (visible) and on inputs drawn from another seed (hidden).
"""

OK_FORMAT = False

from otter.test_files import test_case

name = {name!r}
points = {points!r}


@test_case(points={half!r}, hidden=False)
def on_the_notebooks_inputs(env):
    from labkit.grading.otter import judge
    judge({name!r}, env, inputs=0)


@test_case(points={half!r}, hidden=True)
def on_other_inputs(env):
    from labkit.grading.otter import judge
    judge({name!r}, env, inputs={seed!r})
'''


def judge(name: str, env: Mapping[str, Any], inputs: int = 0) -> None:
    """One Otter test case: raise ``AssertionError`` with the checker's message unless the notebook's ``name`` is
    the learner's own function and passes the kit's checker on ``inputs``."""
    fn = env.get(name)
    if fn is None:
        raise AssertionError(f"{name} is not defined: write the function the notebook asks for, named {name}")
    if fn is exercises.solution(name):
        raise AssertionError(f"{name} is the kit's own function: yours did not pass exercises.check in the notebook, "
                             "which then went on with the kit's version")
    if not callable(fn):
        raise AssertionError(f"{name} is a {type(fn).__name__}, not a function")
    verdict = exercises.verify(name, fn, inputs=inputs, own_work=True)
    if not verdict.ok:
        raise AssertionError(verdict.message)


def export(out: str | Path, *, lesson: str | None = None, seed: int = 1, points: float = 1.0) -> list[Path]:
    """Write ``out/tests/<exercise>.py`` for every exercise (of ``lesson``, e.g. ``"01"``, or all); returns the
    files. ``seed`` (>= 1) picks the hidden cases' inputs: an instructor who keeps it to themselves keeps them
    hidden. ``points`` per exercise, half on each case."""
    names = exercises.of_lesson(lesson)
    if not (isinstance(seed, int) and seed >= 1):
        raise LabkitError(f"seed={seed!r} must be a whole number >= 1 (0 is the notebook's own inputs)")
    if not points > 0:
        raise LabkitError(f"points={points!r} must be above 0")
    tests = Path(out) / "tests"
    tests.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        assert re.fullmatch(r"[a-z_][a-z0-9_]*", name), name  # a Python identifier and a safe file name
        path = tests / f"{name}.py"
        atomic.write_text(path, TEMPLATE.format(name=name, notebook=exercises.notebook_of(name), points=points,
                                                half=points / 2, seed=seed))
        written.append(path)
    return written
