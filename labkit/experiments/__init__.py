"""Experiments, each a module keeping :mod:`labkit.experiments.protocol`'s contract; every notebook has at least one
(notebook 06 has two: serving and speculative decoding), and every experiment names the notebook that teaches it.

The experiments are found by themselves: every module in this package except ``protocol`` is one, and they are
listed in the order of the notebooks that teach them. Adding an experiment is adding its module.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from types import ModuleType

from labkit import LabkitError

_NOT_EXPERIMENTS = {"protocol"}


@cache
def _names() -> tuple[str, ...]:
    found = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")
             and m.name not in _NOT_EXPERIMENTS]
    return tuple(sorted(found, key=lambda n: (importlib.import_module(f"{__name__}.{n}").NOTEBOOK, n)))


def available() -> list[str]:
    """Every experiment, in the order of their notebooks."""
    return list(_names())


def get(name: str) -> ModuleType:
    if name not in _names():
        raise LabkitError(f"unknown experiment {name!r}; known experiments: {', '.join(_names())}")
    return importlib.import_module(f"{__name__}.{name}")


def notebook(name: str) -> str | None:
    """The stem of the notebook that teaches ``name`` (None for a record of an experiment this kit lacks)."""
    return get(name).NOTEBOOK if name in _names() else None


def figures(rec) -> list:
    """The report's figures for a record: its experiment's own, or the generic bars for an unknown one."""
    if rec.experiment in _names():
        return get(rec.experiment).figures(rec)
    from labkit.viz.plots import default_figures

    return default_figures(rec)
