"""Matplotlib figures built from result records. Functions return figures; callers show or save them.

Figures are built with ``matplotlib.figure.Figure``, outside pyplot's global state, so a notebook shows a
returned figure exactly once (pyplot-managed figures are shown again by the inline backend at cell end).
"""

from __future__ import annotations

import io

from matplotlib.figure import Figure

from labkit.results import Record


class LabkitFigure(Figure):
    """A figure outside pyplot that a notebook shows exactly once: it renders itself through ``_repr_png_``
    (IPython asks for it when the figure is a cell's value or passed to ``display``)."""

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        return buf.getvalue()


def new_figure(figsize: tuple[float, float]) -> LabkitFigure:
    return LabkitFigure(figsize=figsize)


def finish_line_plot(fig: Figure, ax, xlabel: str, ylabel: str, title: str) -> Figure:
    """Labels, a light grid, the legend and the title every line plot of the kit gets."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


UNITS = {"weight_bytes": (1e-6, "MB"), "peak_memory_bytes": (1e-6, "MB"), "params": (1e-6, "M params")}


def lines(rows: list[dict], x: str, ys: list[str], *, xlabel: str, ylabel: str, title: str,
          label: str | None = None) -> Figure:
    """One line per column in ``ys`` over ``x`` (rows as dicts); with ``label``, one panel per value of that key."""
    groups = sorted({r[label] for r in rows}) if label else [None]
    fig = new_figure((5.5 * len(groups), 3.6))
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, g in zip(axes, groups):
        part = [r for r in rows if label is None or r[label] == g]
        for y in ys:
            ax.plot([r[x] for r in part], [r[y] for r in part], marker="o", label=y)
        finish_line_plot(fig, ax, xlabel, ylabel, f"{title} · {g}" if g is not None else title)
    fig.tight_layout()
    return fig


def metric_bars(record: Record, metric: str, *, title: str | None = None, log: bool = False,
                model: str | None = None, errors: bool = True) -> Figure:
    """Horizontal bars of ``metric`` for every variant that has it (of one ``model`` if given), in human units
    (bytes as MB), with min–max whiskers where the record has ``<metric>_min`` / ``_max`` (repeated runs)."""
    rows = [v for v in record.variants if isinstance(v.get(metric), (int, float))
            and (model is None or v.get("model") == model)]
    scale, unit = UNITS.get(metric, (1.0, ""))
    fig = new_figure((7, 0.45 * max(len(rows), 2) + 1.2))
    ax = fig.subplots()
    labels = [v["name"] if model else f"{v.get('model', '')} · {v['name']}" for v in rows]
    values = [v[metric] * scale for v in rows]
    xerr = None
    if errors and rows and all(f"{metric}_min" in v and f"{metric}_max" in v for v in rows):
        xerr = [[(v[metric] - v[f"{metric}_min"]) * scale for v in rows],
                [(v[f"{metric}_max"] - v[metric]) * scale for v in rows]]
    ax.barh(labels, values, color="#4C72B0", xerr=xerr, capsize=3 if xerr else 0)
    for i, val in enumerate(values):
        ax.text(val, i, f" {val:,.3g}", va="center", fontsize=8)
    ax.invert_yaxis()
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(f"{metric} ({unit})" if unit else metric)
    ax.set_title(title or f"{record.experiment}: {metric}" + (f" · {model}" if model else ""))
    fig.tight_layout()
    return fig


def scatter(record: Record, x: str, y: str, *, model: str | None = None, title: str | None = None) -> Figure:
    """One point per variant: e.g. memory vs perplexity, each labelled with its name."""
    rows = [v for v in record.variants if isinstance(v.get(x), (int, float)) and isinstance(v.get(y), (int, float))
            and (model is None or v.get("model") == model)]
    fig = new_figure((6.5, 4.2))
    ax = fig.subplots()
    sx, unit = UNITS.get(x, (1.0, ""))
    ax.scatter([v[x] * sx for v in rows], [v[y] for v in rows], color="#C44E52")
    ax.margins(x=0.15, y=0.12)  # room for labels inside the axes
    labels = [ax.annotate(v["name"], (v[x] * sx, v[y]), textcoords="offset points", xytext=(5, 0), fontsize=8,
                          va="center", arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "#999"}) for v in rows]
    ax.set_xlabel(f"{x} ({unit})" if unit else x)
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
    ax.set_title(title or f"{record.experiment}: {y} vs {x}" + (f" ({model})" if model else ""))
    fig.tight_layout()
    spread_labels(fig, labels)
    return fig


def label_boxes(fig: Figure, labels: list) -> list:
    """The display-space boxes of annotation texts (the text alone, not its leader line)."""
    from matplotlib.text import Text

    renderer = fig.canvas.get_renderer() if hasattr(fig.canvas, "get_renderer") else fig._get_renderer()
    for t in labels:
        t.update_positions(renderer)  # an annotation places its text only when drawn
    return [Text.get_window_extent(t, renderer) for t in labels]


def spread_labels(fig: Figure, labels: list, step: float = 2.0, tries: int = 200) -> None:
    """Move point labels apart so that none overlaps another label or a marker and all stay inside the axes: from
    the lowest point up, each label tries offsets 0, +step, -step, +2·step, ... (in points, with a thin leader line
    back to its point), first right of its point, then left of it (points near the right edge), and keeps the first
    place that is clear."""
    from matplotlib.transforms import Bbox

    if not labels:
        return
    ax = labels[0].axes
    inside = ax.get_window_extent()
    px = fig.dpi / 72 * 3  # a marker's half width, in pixels
    markers = [Bbox.from_bounds(x - px, y - px, 2 * px, 2 * px)
               for x, y in (ax.transData.transform(t.xy) for t in labels)]
    placed: list = []
    for t in sorted(labels, key=lambda t: (t.xy[1], t.xy[0])):
        dx, dy = t.xyann
        ha = t.get_horizontalalignment()
        for side, align in ((dx, ha), (-dx, "right" if ha == "left" else "left")):
            t.set_horizontalalignment(align)
            for i in range(tries):
                t.xyann = (side, dy + step * ((i + 1) // 2) * (1 if i % 2 else -1))
                box = label_boxes(fig, [t])[0]
                if (inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1)
                        and not any(box.overlaps(o) for o in placed + markers)):
                    break
            else:
                continue
            break
        else:
            t.xyann, _ = (dx, dy), t.set_horizontalalignment(ha)  # nowhere clear: leave it where it started
        placed.append(label_boxes(fig, [t])[0])


def models_of(record: Record, metric: str | None = None) -> list[str]:
    """The record's models in order of first appearance (only those with ``metric``, if given)."""
    return list(dict.fromkeys(v.get("model") for v in record.variants if metric is None or metric in v))


def latency_bars(record: Record) -> list[Figure]:
    """One latency chart per model: like compared with like (ONNX and TensorRT records)."""
    return [metric_bars(record, "latency_ms_median", model=m, title=f"{record.experiment}: {m} latency (ms)")
            for m in models_of(record, "latency_ms_median")]


def default_figures(record: Record) -> list[Figure]:
    """Bars of the first headline metric the record has, one chart per model (SmolLM2's decode tok/s never shares
    an axis with MiniLM's encode tok/s): what an experiment without figures of its own shows."""
    for metric in ("output_tokens_per_s", "tokens_per_s", "weight_bytes", "perplexity", "accuracy"):
        models = [m for m in models_of(record, metric)  # a one-bar chart compares nothing: the table says it
                  if sum(1 for v in record.variants if v.get("model") == m and metric in v) > 1]
        if models:
            return [metric_bars(record, metric, model=m) for m in models]
    return []


def batch_crossover(record: Record) -> Figure | None:
    """Decode tokens/s against batch size per variant (rows carrying ``batch`` and ``decode_tok_s``), with the
    min-max band of the repeats: where a weight-only format stops beating fp32. None when the record has none."""
    rows = [v for v in record.variants if "batch" in v and "decode_tok_s" in v]
    if not rows:
        return None
    fig = new_figure((7, 3.8))
    ax = fig.subplots()
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = sorted((r for r in rows if r["variant"] == name), key=lambda r: r["batch"])
        b = [r["batch"] for r in mine]
        ax.plot(b, [r["decode_tok_s"] for r in mine], "o-", label=name)
        ax.fill_between(b, [r["decode_tok_s_min"] for r in mine], [r["decode_tok_s_max"] for r in mine], alpha=0.2)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    return finish_line_plot(fig, ax, "requests decoding together (batch)", "decode tokens/s (all requests)",
                            f"{rows[0]['model']}: decode speed by batch size")
