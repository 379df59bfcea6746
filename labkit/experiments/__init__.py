"""The experiment registry: every technique folder's ``experiment`` module(s) (``labkit/quant/experiment.py``,
``labkit/export/experiment_onnx.py`` …, see :mod:`labkit.techniques`), each keeping
:mod:`labkit.experiments.protocol`'s contract and naming itself with ``NAME``. Every notebook has at least one
(notebook 06 has two: serving and speculative decoding), and every experiment names the notebook that teaches it.
They are listed in the order of their notebooks; adding an experiment is adding its module.
"""

from __future__ import annotations

import importlib
from functools import cache
from types import ModuleType

from labkit import LabkitError, techniques


@cache
def _modules() -> dict[str, str]:
    """experiment name -> its module's dotted name, in notebook order."""
    found = [(importlib.import_module(m), m) for m in techniques.modules("experiment")]
    return {mod.NAME: dotted for mod, dotted in sorted(found, key=lambda e: (e[0].NOTEBOOK, e[0].NAME))}


def _names() -> tuple[str, ...]:
    return tuple(_modules())


def clear() -> None:
    """Forget what was found (a test that adds a technique folder calls it)."""
    techniques.clear()
    _modules.cache_clear()


def available() -> list[str]:
    """Every experiment, in the order of their notebooks."""
    return list(_names())


def get(name: str) -> ModuleType:
    if name not in _names():
        raise LabkitError(f"unknown experiment {name!r}; known experiments: {', '.join(_names())}")
    return importlib.import_module(_modules()[name])


def notebook(name: str) -> str | None:
    """The stem of the notebook that teaches ``name`` (None for a record of an experiment this kit lacks)."""
    return get(name).NOTEBOOK if name in _names() else None


def figures(rec) -> list:
    """The report's figures for a record: its experiment's own, or the generic bars for an unknown one."""
    if rec.experiment in _names():
        return get(rec.experiment).figures(rec)
    from labkit.viz.plots import default_figures

    return default_figures(rec)
