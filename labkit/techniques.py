"""Where each lesson's code lives: one folder per technique, beside the shared core.

A technique folder is a package of :mod:`labkit` holding an ``experiment`` module (two lessons' worth, such as
``export``'s ONNX and TensorRT, hold ``experiment_onnx`` and ``experiment_tensorrt``), with its math, its wiring,
its ``exercise`` module(s) and its ``figures``. Everything else in ``labkit`` is the shared core. The registries
(:mod:`labkit.experiments`, :mod:`labkit.exercises`) find the modules here, so adding a technique is adding a folder.
"""

from __future__ import annotations

import os
import pkgutil
from functools import cache

import labkit

KINDS = ("experiment", "exercise")


def _is(kind: str, module: str) -> bool:
    return module == kind or module.startswith(kind + "_")


@cache
def folders() -> tuple[str, ...]:
    """The technique packages (``"quant"``, ``"serve"``, …): those with an experiment module."""
    return tuple(sorted(name for name in _packages() if any(_is("experiment", m) for m in _packages()[name])))


@cache
def _packages() -> dict[str, list[str]]:
    """Every subpackage of labkit and its modules' names, read from the files (nothing is imported)."""
    found: dict[str, list[str]] = {}
    for pkg in pkgutil.iter_modules(labkit.__path__):
        if pkg.ispkg and not pkg.name.startswith("_"):
            inner = os.path.join(pkg.module_finder.path, pkg.name)
            found.setdefault(pkg.name, []).extend(m.name for m in pkgutil.iter_modules([inner]))
    return found


def modules(kind: str) -> list[str]:
    """The dotted names of every technique's ``kind`` modules (``kind``: "experiment" or "exercise")."""
    if kind not in KINDS:
        raise labkit.LabkitError(f"kind={kind!r}: allowed {', '.join(KINDS)}")
    out = []
    for folder in folders():
        out += [f"labkit.{folder}.{m}" for m in sorted(_packages()[folder]) if _is(kind, m)]
    return out


def core() -> list[str]:
    """The shared core: every top-level module and package of labkit that is not a technique folder."""
    return sorted(m.name for m in pkgutil.iter_modules(labkit.__path__)
                  if m.name not in folders() and not m.name.startswith("_"))


def clear() -> None:
    """Forget what was found (a test that adds a folder calls it)."""
    folders.cache_clear()
    _packages.cache_clear()
