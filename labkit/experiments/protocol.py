"""The contract every experiment module keeps, so adding one touches only its own module, notebook and tests.

An experiment module, ``labkit/<technique>/experiment.py`` (or ``experiment_<name>.py`` where one folder holds two
lessons' experiments), defines:

- ``NAME``: what ``labkit run NAME`` calls it and its record is named;
- ``Config``: a dataclass with ``quick()`` and ``smallest()`` class methods;
- ``run(config, progress=True) -> Record``: builds its :class:`Variant` s, times them with one
  :func:`labkit.measure.compare_latency` (or :func:`labkit.measure.interleaved` + :func:`labkit.measure.speedups`)
  call against a named baseline, and stores ``check(record, TARGETS)`` under ``record.config["targets"]``;
- ``NOTEBOOK``: the stem of the notebook that teaches it (``notebooks/<NOTEBOOK>.ipynb``);
- ``TARGETS``: a list of :class:`Target` — what the experiment promises, as data;
- ``figures(record) -> list[Figure]``: the figures the HTML report shows for its record;

:mod:`labkit.experiments` finds the modules by themselves (no list of names anywhere), and ``labkit report``,
``make report`` and the CLI read them through it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from labkit import LabkitError
from labkit.results import Record

REQUIRED = ("NAME", "Config", "run", "NOTEBOOK", "TARGETS", "figures")


@dataclass(frozen=True)
class Variant:
    """One thing an experiment builds and measures: its record name, how to build it, a sentence on what it is,
    and its settings as fields (a temperature is ``settings["temperature"]``, never parsed back out of the name)."""

    name: str
    build: Callable[..., Any]
    about: str = ""
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    """A checked promise: ``value(record)`` against ``limit`` (``kind`` "max": at most, "min": at least).

    ``value`` reads the record's variants and its config (``record.config`` holds the run's settings, so a name
    such as ``structured-40-finetuned`` is rebuilt from ``cnn_ratio``). It returns None, or raises
    :class:`LabkitError` (``record.variant`` does for an absent name), when what it reads is not in the record (a
    smaller run, a machine without the library): the target is then reported as not measured, never as passed."""

    key: str  # formatted with the record's config: "{llm}/int8/perplexity_ratio"
    value: Callable[[Record], float | None]
    limit: float
    kind: str = "min"

    def __post_init__(self) -> None:
        if self.kind not in ("min", "max"):
            raise LabkitError(f"Target kind={self.kind!r}: allowed 'min' (at least) or 'max' (at most)")


def check(rec: Record, targets: list[Target]) -> dict[str, dict]:
    """Every target evaluated on ``rec``: ``{key: {"value", "limit", "kind", "ok"}}``, ``ok`` None when the value
    could not be measured from this record."""
    out: dict[str, dict] = {}
    for t in targets:
        try:
            value = t.value(rec)
        except LabkitError:
            value = None
        value = None if value is None else float(value)
        ok = None if value is None else (value <= t.limit if t.kind == "max" else value >= t.limit)
        out[t.key.format_map(rec.config)] = {"value": value, "limit": t.limit, "kind": t.kind, "ok": ok}
    return out

