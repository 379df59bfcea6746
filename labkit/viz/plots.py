"""Matplotlib figures built from result records. Functions return figures; callers show or save them.

Figures are built with ``matplotlib.figure.Figure``, outside pyplot's global state, so a notebook shows a
returned figure exactly once (pyplot-managed figures are shown again by the inline backend at cell end).
"""

from __future__ import annotations

import matplotlib

matplotlib.use(matplotlib.get_backend() if matplotlib.get_backend().lower() != "macosx" else "Agg")
import matplotlib.pyplot  # noqa: E402,F401 - registers the notebook's figure display; figures stay outside it
from matplotlib.figure import Figure  # noqa: E402

from labkit.results import Record  # noqa: E402

# Which metric to plot against which, per experiment (x, y, higher_is_better for y).
SCATTERS: dict[str, tuple[str, str]] = {
    "quantization": ("weight_bytes", "perplexity"),
}


def metric_bars(record: Record, metric: str, *, title: str | None = None, log: bool = False) -> Figure:
    """Horizontal bars of ``metric`` for every variant that has it, labelled model/name."""
    rows = [v for v in record.variants if isinstance(v.get(metric), (int, float))]
    fig = Figure(figsize=(7, 0.45 * max(len(rows), 2) + 1.2))
    ax = fig.subplots()
    labels = [f"{v.get('model', '')} · {v['name']}" for v in rows]
    values = [v[metric] for v in rows]
    ax.barh(labels, values, color="#4C72B0")
    for i, val in enumerate(values):
        ax.text(val, i, f" {val:,.3g}", va="center", fontsize=8)
    ax.invert_yaxis()
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(metric)
    ax.set_title(title or f"{record.experiment}: {metric}")
    fig.tight_layout()
    return fig


def scatter(record: Record, x: str, y: str, *, model: str | None = None, title: str | None = None) -> Figure:
    """One point per variant: e.g. memory vs perplexity, each labelled with its name."""
    rows = [v for v in record.variants if isinstance(v.get(x), (int, float)) and isinstance(v.get(y), (int, float))
            and (model is None or v.get("model") == model)]
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    ax.scatter([v[x] for v in rows], [v[y] for v in rows], color="#C44E52")
    for v in rows:
        ax.annotate(v["name"], (v[x], v[y]), textcoords="offset points", xytext=(4, 3), fontsize=8)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
    ax.set_title(title or f"{record.experiment}: {y} vs {x}" + (f" ({model})" if model else ""))
    fig.tight_layout()
    return fig


def record_figures(record: Record) -> list[Figure]:
    """The standard figures for a record, used by the HTML report."""
    if record.experiment in SCATTERS:
        x, y = SCATTERS[record.experiment]
        models = sorted({v.get("model") for v in record.variants if y in v})
        return [scatter(record, x, y, model=m) for m in models]
    for metric in ("output_tokens_per_s", "tokens_per_s", "weight_bytes", "perplexity", "accuracy"):
        if any(metric in v for v in record.variants):
            return [metric_bars(record, metric)]
    return []
