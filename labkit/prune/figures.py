"""Pictures for pruning: the weight histogram with the pruned region shaded, per-layer sensitivity, the recovery
curve, and the SparsityExplorer's state → figure function (the widget only wires controls to it)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from labkit.prune.unstructured import global_magnitude_masks, prunable_layers
from labkit.viz.plots import finish_line_plot, new_figure, spread_labels
from labkit.viz.widgets import Explorer

METHOD_LABELS = {"global": "global magnitude masks", "layer": "layer-wise magnitude masks",
                 "structured": "structured channels (no fine-tune)"}


def all_weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([m.weight.detach().flatten().float() for _, m in prunable_layers(model)])


def histogram_on(ax, weights: torch.Tensor, sparsity: float) -> float:
    """Draw a histogram of ``weights`` with the global-magnitude region that ``sparsity`` removes shaded; returns
    the threshold ``|w|`` below which weights are pruned."""
    w = weights.detach().flatten().float().cpu()  # matplotlib reads host memory
    keep = global_magnitude_masks([w], sparsity)[0] if sparsity > 0 else torch.ones_like(w, dtype=torch.bool)
    thr = float(w[~keep].abs().max()) if (~keep).any() else 0.0
    lim = float(w.abs().quantile(0.999)) if w.numel() > 1 else 1.0
    ax.hist(w.clamp(-lim, lim).numpy(), bins=120, color="#4C72B0", alpha=0.85)
    if thr > 0:
        ax.axvspan(-thr, thr, color="#C44E52", alpha=0.25, label=f"pruned: |w| ≤ {thr:.3g} ({sparsity:.0%})")
        ax.legend(fontsize=8)
    ax.set_xlabel("weight value")
    ax.set_ylabel("count")
    return thr


def weight_histogram(weights: torch.Tensor, sparsity: float, title: str = "weights"):
    fig = new_figure((7, 3))
    ax = fig.subplots()
    histogram_on(ax, weights, sparsity)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def sensitivity_figure(rows: list[dict], metric: str = "accuracy", pruned: str = "weights"):
    """One line per layer: the metric when that layer alone is pruned to each ratio (dense as a dashed line);
    ``pruned`` names what the scan removed ("weights" for ``scan``, "channels" for ``scan_channels``)."""
    fig = new_figure((7, 3.6))
    ax = fig.subplots()
    dense = next(r["metric"] for r in rows if r["layer"] == "dense")
    for layer in dict.fromkeys(r["layer"] for r in rows if r["layer"] != "dense"):
        pts = [(0.0, dense)] + [(r["sparsity"], r["metric"]) for r in rows if r["layer"] == layer]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=layer)
    ax.axhline(dense, color="gray", ls="--", lw=1)
    return finish_line_plot(fig, ax, f"fraction of this layer's {pruned} removed (this layer alone)", metric,
                            f"per-layer sensitivity: {pruned} removed")


def recovery_figure(losses: list[float], before: float | None = None, after: float | None = None,
                    dense: float | None = None):
    """KD loss per recovery step, with perplexity before/after recovery (and dense) in the title."""
    fig = new_figure((7, 3))
    ax = fig.subplots()
    ax.plot(range(1, len(losses) + 1), losses, marker=".", color="#55A868", label="KD loss (KL to the dense model)")
    title = "recovery by distillation from the dense model"
    if before is not None and after is not None:
        title += f": perplexity {before:.1f} → {after:.1f}" + (f" (dense {dense:.1f})" if dense else "")
    return finish_line_plot(fig, ax, "step", "loss", title)


def tradeoff_figure(record, model: str, metric: str):
    """Latency vs quality for one model's variants, the dense one marked."""
    rows = [v for v in record.variants if v.get("model") == model and metric in v]
    fig = new_figure((6.5, 4))
    ax = fig.subplots()
    labels = []
    for v in rows:
        ax.scatter(v["latency_ms_median"], v[metric], color="#C44E52" if v["name"] == "dense" else "#4C72B0")
        ax.errorbar(v["latency_ms_median"], v[metric], xerr=v.get("latency_ms_iqr", 0) / 2, color="gray", lw=0.8)
        labels.append(ax.annotate(v["name"], (v["latency_ms_median"], v[metric]), textcoords="offset points",
                                  xytext=(5, 0), va="center", fontsize=8,
                                  arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "#999"}))
    ax.margins(x=0.15, y=0.12)
    if metric == "perplexity":
        ax.set_yscale("log")
    ax.set_xlabel("latency (ms, median; bar = IQR)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.set_title(f"{model}: {metric} vs latency", fontsize=10)
    fig.tight_layout()
    spread_labels(fig, labels)
    return fig


def sparsity_explorer_figure(sweep: list[dict], method: str, sparsity: float, weights: torch.Tensor
                             ) -> tuple[Any, dict[str, Any]]:
    """Three panels for one (method, sparsity) of a precomputed :func:`labkit.prune.experiment.sweep`:
    accuracy and latency vs sparsity for every method (the chosen point ringed), and the weight histogram with the
    pruned region shaded. Returns the figure and the chosen row."""
    row = min((r for r in sweep if r["method"] == method), key=lambda r: abs(r["sparsity"] - sparsity))
    fig = new_figure((12, 3.4))
    a1, a2, a3 = fig.subplots(1, 3)
    for m in dict.fromkeys(r["method"] for r in sweep):
        pts = sorted((r["sparsity"], r["accuracy"], r["latency_ms_median"]) for r in sweep if r["method"] == m)
        a1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=METHOD_LABELS.get(m, m))
        a2.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=METHOD_LABELS.get(m, m))
    a1.scatter([row["sparsity"]], [row["accuracy"]], s=160, facecolors="none", edgecolors="black", zorder=5)
    a2.scatter([row["sparsity"]], [row["latency_ms_median"]], s=160, facecolors="none", edgecolors="black", zorder=5)
    a1.set(xlabel="sparsity", ylabel="test accuracy", title="accuracy")
    a2.set(xlabel="sparsity", ylabel="ms per batch (median)", title="latency", ylim=(0, None))
    a1.legend(fontsize=7)
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
    histogram_on(a3, weights, row["sparsity"] if method != "structured" else 0.0)
    a3.set_title("all weights" + (" (structured removes whole channels)" if method == "structured" else ""),
                 fontsize=9)
    fig.suptitle(f"{METHOD_LABELS.get(method, method)} at {row['sparsity']:.0%}: accuracy {row['accuracy']:.3f}, "
                 f"{row['params']:,} params, {row['weight_bytes'] / 1e3:.1f} kB, {row['latency_ms_median']:.2f} ms",
                 fontsize=10)
    fig.tight_layout()
    return fig, row


class SparsityExplorer(Explorer):
    """A sparsity slider and a method choice over a precomputed sweep (``labkit.prune.experiment.sweep``) →
    accuracy, params, latency, and the weight histogram with the pruned region shaded."""

    def __init__(self, model: nn.Module, sweep: list[dict[str, Any]]) -> None:
        import ipywidgets as W

        self.sweep, self.weights = sweep, all_weights(model)
        levels = sorted({r["sparsity"] for r in sweep})
        self.sparsity = W.SelectionSlider(options=[(f"{s:.0%}", s) for s in levels], value=levels[len(levels) // 2],
                                          description="sparsity", continuous_update=False)
        self.method = W.ToggleButtons(options=list(dict.fromkeys(r["method"] for r in sweep)), description="method")
        self.layout(W.HBox([self.sparsity, self.method]))
        self.watch(self.sparsity, self.method)

    def update(self) -> dict[str, Any]:
        fig, row = sparsity_explorer_figure(self.sweep, self.method.value, self.sparsity.value, self.weights)
        self.show(fig)
        return row
