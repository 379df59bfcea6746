"""Pictures for quantization: a weight histogram with the quantization grid of its widest group and the error it
leaves, and the QuantExplorer that draws them for any layer, scheme, bit width and group size."""

from __future__ import annotations

from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn

from labkit.quant.explore import SCHEMES, grid_of_widest_group, quant_stats
from labkit.results import Record
from labkit.viz.plots import new_figure, scatter
from labkit.viz.widgets import Explorer


def quant_explorer_figure(w: torch.Tensor, scheme: str = "asymmetric", bits: int = 4,
                          group_size: int | None = 64, title: str = "",
                          double_quant: bool = False) -> tuple[Figure, dict[str, Any]]:
    """Weight histogram with the quantization grid of the widest group, and the error histogram."""
    w = w.detach().float().cpu()
    stats = quant_stats(w, scheme, bits, group_size, double_quant)
    grid = grid_of_widest_group(w, scheme, bits, group_size)
    fig = new_figure((11, 3.6))
    a, b = fig.subplots(1, 2)
    a.hist(w.reshape(-1).numpy(), bins=200, color="#4C72B0", alpha=0.8)
    if len(grid) <= 64:
        for g in grid.tolist():
            a.axvline(g, color="#C44E52", lw=0.6, alpha=0.7)
    a.set_title(f"{title} weights + grid of the widest group ({len(grid)} levels)")
    a.set_yscale("log")
    err = (stats["dequantized"] - w).reshape(-1).numpy()
    b.hist(err, bins=200, color="#DD8452")
    b.set_title(f"error · SQNR {stats['sqnr_db']:.1f} dB · {stats['bits_per_weight']:.2f} bits/weight · "
                f"{stats['bytes'] / 1e3:.0f} kB (fp32 {stats['fp32_bytes'] / 1e3:.0f}) · {stats['bytes_source']}",
                fontsize=8)
    fig.tight_layout()
    return fig, stats


class QuantExplorer(Explorer):
    """Pick a model, layer, scheme, bits, group size and double quantization → histograms, SQNR and bytes (from
    a real packed layer where one exists); below, the measured variants of the record."""

    def __init__(self, models: nn.Module | dict[str, nn.Module], record: Record | None = None,
                 model_name: str | None = None) -> None:
        import ipywidgets as W

        self.models = models if isinstance(models, dict) else {model_name or "model": models}
        self.record, self.model_name = record, model_name
        self.model = W.Dropdown(options=list(self.models), description="model")
        self.layer = W.Dropdown(options=self._layers(self.model.value), description="layer")
        self.scheme = W.ToggleButtons(options=SCHEMES, value="asymmetric", description="scheme")
        self.bits = W.ToggleButtons(options=[2, 3, 4, 8], value=4, description="bits")
        self.group = W.Dropdown(options=[("per channel", None), ("256", 256), ("128", 128), ("64", 64), ("32", 32)],
                                value=64, description="group")
        self.double_quant = W.Checkbox(value=False, description="double quant (nf4)")
        self.layout(W.HBox([self.model, self.layer]), W.HBox([self.group, self.double_quant]), self.scheme, self.bits)
        self.model.observe(self._switch_model, names="value")
        self.watch(self.layer, self.scheme, self.bits, self.group, self.double_quant)

    def _layers(self, name: str) -> list[str]:
        return [n for n, m in self.models[name].named_modules() if isinstance(m, nn.Linear)]

    def _switch_model(self, change) -> None:
        self.layer.options = self._layers(change["new"])  # resets the layer, which redraws

    def update(self) -> dict[str, Any]:
        w = self.models[self.model.value].get_submodule(self.layer.value).weight
        fig, stats = quant_explorer_figure(w, self.scheme.value, self.bits.value, self.group.value,
                                           title=self.layer.value, double_quant=self.double_quant.value)
        measured = [] if self.record is None else [scatter(self.record, "weight_bytes", "perplexity",
                                                           model=self.model_name,
                                                           title="measured variants: memory vs perplexity")]
        self.show(fig, *measured)
        return stats
