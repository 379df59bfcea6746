"""The trade-off picture behind a decision: every variant of one model as cost vs quality, the Pareto front as a
line, and the variant :func:`labkit.select.select` chooses for a threshold ringed, with its recipe."""

from __future__ import annotations

from typing import Any

from labkit import LabkitError, select
from labkit.viz.plots import UNITS, new_figure, spread_labels
from labkit.viz.widgets import Explorer

COST_LABELS = {"weight_bytes": "memory (MB)", "latency_ms_median": "latency (ms, median)", "params": "params (M)"}


def tradeoff_figure(rows: list[dict], *, model: str, metric: str, cost: str = "weight_bytes", within: float = 0.01,
                    hardware: str | None = None) -> tuple[Any, dict[str, Any]]:
    """Scatter of ``cost`` vs ``metric`` for ``model`` (one ``hardware`` if given), front and choice marked.

    Returns the figure and ``{"choice", "reason", "recipe", "front"}`` (``choice`` None with the reason when no
    variant qualifies)."""
    pts = select.candidates(rows, model=model, metric=metric, cost=cost, hardware=hardware)
    scale = UNITS.get(cost, (1.0, ""))[0]
    try:
        choice = select.select(rows, model=model, metric=metric, cost=cost, within=within, hardware=hardware)
        info = {"choice": choice.variant["name"], "reason": choice.reason, "recipe": choice.recipe}
    except LabkitError as exc:
        choice, info = None, {"choice": None, "reason": str(exc), "recipe": []}
    fig = new_figure((7, 4.2))
    ax = fig.subplots()
    labels = []
    for r in pts:
        ax.scatter(r[cost] * scale, r[metric], color="#4C72B0" if r["on_pareto_front"] else "#BBBBBB", zorder=3)
        labels.append(ax.annotate(f"{r['name']}" + (f" [{r['hardware']}]" if hardware is None else ""),
                                  (r[cost] * scale, r[metric]), textcoords="offset points", xytext=(5, 0),
                                  va="center", fontsize=7, arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "#999"}))
    ax.margins(x=0.15, y=0.12)  # room for the labels inside the axes
    front = sorted((r for r in pts if r["on_pareto_front"]), key=lambda r: r[cost])
    ax.plot([r[cost] * scale for r in front], [r[metric] for r in front], color="#4C72B0", lw=1, label="Pareto front")
    if choice is not None:
        ax.scatter(choice.variant[cost] * scale, choice.variant[metric], s=260, facecolors="none",
                   edgecolors="#C44E52", lw=2, zorder=4, label=f"choice: {choice.variant['name']}")
    if metric == "perplexity":
        ax.set_yscale("log")
    ax.set_xlabel(COST_LABELS.get(cost, cost))
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{model}: {metric} vs {COST_LABELS.get(cost, cost)} (allowed loss {within:g})", fontsize=10)
    fig.tight_layout()
    spread_labels(fig, labels)  # the dense corner's labels each get a place of their own
    info["front"] = [r["name"] for r in front]
    return fig, info


class TradeoffExplorer(Explorer):
    """Axes, model, hardware and an allowed-quality-loss slider over every record present → the scatter with its
    Pareto front and the chosen variant (the smallest or fastest within the threshold), with its recipe."""

    def __init__(self, rows: list[dict[str, Any]], model: str | None = None) -> None:
        import ipywidgets as W

        from labkit.select import COSTS, HIGHER_IS_BETTER

        self.rows = rows
        models = sorted({r["model"] for r in rows if r.get("model") and any(m in r for m in HIGHER_IS_BETTER)})
        self.model = W.Dropdown(options=models, value=model or models[0], description="model")
        self.metric = W.Dropdown(description="quality")
        self.cost = W.Dropdown(options=list(COSTS), value="weight_bytes", description="cost")
        self.hardware = W.Dropdown(description="hardware")
        self.within = W.FloatLogSlider(value=0.01, base=10, min=-3, max=0, step=0.25, description="allowed loss",
                                       continuous_update=False)
        self.layout(W.HBox([self.model, self.metric, self.cost]), W.HBox([self.hardware, self.within]))
        self._refresh_options()
        self.watch(self.model, then=lambda: (self._refresh_options(), self.update()))
        self.watch(self.metric, self.cost, self.hardware, self.within)

    def _refresh_options(self) -> None:
        from labkit.select import HIGHER_IS_BETTER

        mine = [r for r in self.rows if r.get("model") == self.model.value]
        for control, options in ((self.metric, [m for m in HIGHER_IS_BETTER if any(m in r for r in mine)]),
                                 (self.hardware, sorted({r["hardware"] for r in mine}))):
            control.options = options
            control.value = options[0] if options else None

    def update(self) -> dict[str, Any]:
        try:
            fig, info = tradeoff_figure(self.rows, model=self.model.value, metric=self.metric.value,
                                        cost=self.cost.value, within=self.within.value, hardware=self.hardware.value)
        except LabkitError as exc:  # a combination without data is a message, not a crash
            self.show(str(exc))
            return {"choice": None, "reason": str(exc)}
        self.show(fig, info["reason"], *(["recipe: " + " → ".join(info["recipe"])] if info["recipe"] else []))
        return info
