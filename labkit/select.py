"""Choose from measurements: every variant of every record, Pareto fronts, and "the smallest (or fastest) variant
whose quality is within X of the baseline" — with its recipe and the reason.

Quality metrics and their direction: ``accuracy`` and ``cosine_to_reference`` (higher is better, a drop is measured
in absolute terms), ``perplexity`` (lower is better, a rise is measured relative to the baseline: 0.1 = +10 %).
Costs (lower is better): ``weight_bytes``, ``latency_ms_median``, ``params``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labkit import LabkitError, __version__
from labkit.results import Record, reference_dirs

HIGHER_IS_BETTER = {"accuracy": True, "cosine_to_reference": True, "perplexity": False}
COSTS = ("weight_bytes", "latency_ms_median", "params")
BASELINES = ("dense", "fp32", "pytorch-fp32", "teacher", "lm-teacher")
# What "keeps quality" means everywhere in the kit (the report's headline, the capstone's decisions): at most this
# much lost against the baseline, in select()'s terms (absolute for accuracy/cosine, relative for perplexity).
KEEPS_QUALITY = {"accuracy": 0.015, "cosine_to_reference": 0.01, "perplexity": 0.1}


def loss(row: dict[str, Any], base: dict[str, Any], metric: str) -> float:
    """How much ``metric`` ``row`` lost against ``base``: an absolute drop (accuracy, cosine) or a relative rise
    (perplexity: 0.1 = +10 %); negative when it is better."""
    if metric not in HIGHER_IS_BETTER:
        raise LabkitError(f"metric={metric!r} is not a quality metric; use one of {tuple(HIGHER_IS_BETTER)}")
    return base[metric] - row[metric] if HIGHER_IS_BETTER[metric] else row[metric] / base[metric] - 1


def keeps_quality(row: dict[str, Any], base: dict[str, Any], within: dict[str, float] | None = None) -> bool:
    """Whether ``row`` is within ``within`` (default :data:`KEEPS_QUALITY`) of ``base`` on the first quality metric
    both have; True when they share none (nothing to lose)."""
    within = KEEPS_QUALITY if within is None else within
    for metric in ("accuracy", "cosine_to_reference", "perplexity"):
        if isinstance(row.get(metric), (int, float)) and isinstance(base.get(metric), (int, float)):
            return loss(row, base, metric) <= within[metric] + 1e-12
    return True


def _read(path: Path, allow_old: bool) -> Record:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LabkitError(f"{path} is not a readable labkit record ({exc}); delete it or rerun its experiment "
                          f"(labkit run {path.stem} --quick)") from None
    if not isinstance(data, dict) or "experiment" not in data or not isinstance(data.get("variants"), list):
        raise LabkitError(f"{path} is not a labkit record (no experiment/variants); delete it or rerun its experiment")
    version = data.get("labkit_version") or "unknown"
    if version.split(".")[:2] != __version__.split(".")[:2] and not allow_old:
        raise LabkitError(f"{path} was written by labkit {version}, this is {__version__}: its metrics may mean "
                          f"something else; rerun `labkit run {data['experiment']} --quick`, or pass allow_old=True")
    return Record.from_dict(data)


def load_rows(results_dir: str | Path | None = "results", *, include_reference: bool = True,
              allow_old: bool = False) -> list[dict[str, Any]]:
    """One row per variant of every record in ``results_dir`` (labelled ``hardware="this machine"``) and, if
    asked, of every reference record (labelled with its folder, e.g. ``cpu-epyc-2core``)."""
    sources: list[tuple[Path, str]] = []
    if results_dir is not None:
        d = Path(results_dir)
        if not d.is_dir():
            raise LabkitError(f"results directory {str(d)!r} does not exist; run `labkit run EXPERIMENT --quick` first")
        sources += [(p, "this machine") for p in sorted(d.glob("*.json"))]
    if include_reference:
        for ref in reference_dirs():
            sources += [(p, p.parent.name) for p in sorted(ref.glob("*/*.json"))]
    rows = []
    for path, hardware in sources:
        rec = _read(path, allow_old)
        for v in rec.variants:
            rows.append({**v, "experiment": rec.experiment, "hardware": hardware, "source": str(path)})
    if not rows:
        raise LabkitError(
            f"no records found in {results_dir!r}"
            + (" or in the reference records (labkit/reference)" if include_reference else "")
            + "; run `labkit run EXPERIMENT --quick`"
        )
    return rows


def human(key: str, value: float) -> str:
    """A number in the units people read: bytes as kB/MB/GB, latency in ms, params in k/M, quality as is."""
    if key == "weight_bytes":
        for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
            if value >= div:
                return f"{value / div:.3g} {unit}"
        return f"{value:.0f} B"
    if key == "params":
        if value >= 1e9:
            return f"{value / 1e9:.3g} B"
        return f"{value / 1e6:.3g} M" if value >= 1e6 else f"{value / 1e3:.3g} k" if value >= 1e3 else f"{value:.0f}"
    if key.startswith("latency_ms"):
        return f"{value:.3g} ms"
    return f"{value:.4g}"


def dominates(a: tuple[float, float], b: tuple[float, float], higher_is_better: bool) -> bool:
    """``a = (cost, quality)`` is at least as good as ``b`` in both and strictly better in one."""
    qa, qb = (a[1], b[1]) if higher_is_better else (-a[1], -b[1])
    return a[0] <= b[0] and qa >= qb and (a[0] < b[0] or qa > qb)


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool = True) -> list[int]:
    """Indices of the points no other point dominates (lower cost, better quality). Exact duplicates of a front
    point are on the front too: neither dominates the other."""
    return [i for i, p in enumerate(points) if not any(dominates(q, p, higher_is_better)
                                                        for j, q in enumerate(points) if j != i)]


def _check_metric(metric: str, cost: str) -> bool:
    if metric not in HIGHER_IS_BETTER:
        raise LabkitError(f"metric={metric!r} is not a quality metric; use one of {tuple(HIGHER_IS_BETTER)}")
    if cost not in COSTS:
        raise LabkitError(f"cost={cost!r} is not allowed; use one of {COSTS}")
    return HIGHER_IS_BETTER[metric]


def candidates(rows: list[dict], *, model: str, metric: str, cost: str, hardware: str | None = None,
               experiment: str | None = None) -> list[dict]:
    """Rows of ``model`` (and ``hardware``/``experiment`` if given) that have both numbers, with ``on_pareto_front``
    set for this (cost, metric) pair."""
    hib = _check_metric(metric, cost)
    got = [r for r in rows if r.get("model") == model and isinstance(r.get(metric), (int, float))
           and isinstance(r.get(cost), (int, float)) and (hardware is None or r.get("hardware") == hardware)
           and (experiment is None or r.get("experiment") == experiment)]
    if not got:
        models = sorted({str(r.get("model")) for r in rows if metric in r and cost in r})
        raise LabkitError(f"no variant of model={model!r} has both {metric} and {cost}; models that do: {models}")
    front = set(pareto_front([(r[cost], r[metric]) for r in got], hib))
    return [{**r, "on_pareto_front": i in front} for i, r in enumerate(got)]


@dataclass
class Choice:
    variant: dict[str, Any]
    baseline: dict[str, Any]
    reason: str
    front: list[dict[str, Any]]

    @property
    def recipe(self) -> list[str]:
        return list(self.variant.get("recipe") or [self.variant["name"]])


def select(rows: list[dict], *, model: str, metric: str, within: float | None = None, threshold: float | None = None,
           cost: str = "weight_bytes", baseline: str | None = None, hardware: str | None = None,
           experiment: str | None = None) -> Choice:
    """The lowest-``cost`` variant whose ``metric`` is good enough: ``within`` of the baseline's (an absolute drop
    for accuracy/cosine, 0.015 = 1.5 points; a relative rise for perplexity, 0.1 = +10 %), or past an absolute
    ``threshold`` (accuracy >= 0.97, perplexity <= 20). Give exactly one of the two."""
    if (within is None) == (threshold is None):
        raise LabkitError(f"give exactly one of within= (loss allowed vs the baseline) or threshold= (absolute "
                          f"{metric} bound); got within={within!r}, threshold={threshold!r}")
    if within is not None and (not isinstance(within, (int, float)) or within < 0):
        raise LabkitError(f"within={within!r} must be a number >= 0 (the quality loss allowed)")
    rows = candidates(rows, model=model, metric=metric, cost=cost, hardware=hardware, experiment=experiment)
    hib = HIGHER_IS_BETTER[metric]
    names = [baseline] if baseline else list(BASELINES)
    base = next((r for n in names for r in rows if r["name"] == n), None)
    if base is None:
        raise LabkitError(f"no baseline variant {names} for model {model!r}; pass baseline= one of "
                          f"{sorted({r['name'] for r in rows})}")

    def short(r: dict) -> float:  # how far r is from qualifying (<= 0: it qualifies)
        if threshold is not None:
            return threshold - r[metric] if hib else r[metric] - threshold
        return loss(r, base, metric) - within

    bound = f"{metric} {'>=' if hib else '<='} {threshold:g}" if threshold is not None else \
        f"{metric} within {within:g} {'(absolute)' if hib else '(relative)'} of {base['name']} ({base[metric]:.4g})"
    ok = [r for r in rows if short(r) <= 1e-12]
    if not ok:
        closest = min(rows, key=short)
        raise LabkitError(f"no variant of {model} has {bound}; the closest is {closest['name']} at "
                          f"{closest[metric]:.4g}, {short(closest):.3g} short")
    best = min(ok, key=lambda r: (r[cost], short(r)))
    reason = (f"{best['name']} has the lowest {cost} ({human(cost, best[cost])}; {base['name']}: "
              f"{human(cost, base[cost])}) among the {len(ok)} of {len(rows)} variants with {bound}: {metric} "
              f"{human(metric, best[metric])}")
    return Choice(best, base, reason, [r for r in rows if r["on_pareto_front"]])
