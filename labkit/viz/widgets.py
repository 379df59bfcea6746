"""ipywidgets explorers. The state → figure logic is a plain function tests drive without a browser;
the widget classes only wire controls to it."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from torch import nn

from labkit.quant import primitives as P
from labkit.results import Record
from labkit.viz.plots import scatter

SCHEMES = ("symmetric", "asymmetric", "nf4")


def quant_stats(w: torch.Tensor, scheme: str, bits: int, group_size: int | None) -> dict[str, Any]:
    """Quantize ``w`` (2-D) with the chosen settings; return the dequantized tensor, SQNR and real bytes."""
    if scheme == "nf4":
        bits = 4
    deq = P.fake_quantize(w, bits, scheme=scheme, group_size=group_size)
    rows, cols = w.shape
    g = group_size or cols
    n_groups = rows * -(-cols // g)
    const_bytes = {"symmetric": 2, "asymmetric": 3, "nf4": 4}[scheme]  # fp16 scale (+ uint8 zero) | fp32 absmax
    nbytes = rows * -(-cols // g) * g * bits // 8 + n_groups * const_bytes
    return {"dequantized": deq, "sqnr_db": P.sqnr(w, deq), "bytes": nbytes, "fp32_bytes": w.numel() * 4,
            "bits_per_weight": 8 * nbytes / w.numel()}


def quant_explorer_figure(w: torch.Tensor, scheme: str = "asymmetric", bits: int = 4,
                          group_size: int | None = 64, title: str = "") -> tuple[Figure, dict[str, Any]]:
    """Weight histogram with the quantization grid of the widest group, and the error histogram."""
    w = w.detach().float()
    stats = quant_stats(w, scheme, bits, group_size)
    groups, _ = P.to_groups(w, group_size)
    widest = groups[groups.abs().amax(1).argmax()]
    if scheme == "nf4":
        grid = P.NF4_CODE * widest.abs().max()
    elif scheme == "symmetric":
        qmax = 2 ** (bits - 1) - 1
        grid = torch.arange(-qmax, qmax + 1) * widest.abs().max() / qmax
    else:
        _, s, z = P.quantize_asymmetric(widest.unsqueeze(0), bits)
        grid = (torch.arange(2**bits) - z[0]) * s[0]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    a.hist(w.reshape(-1).numpy(), bins=200, color="#4C72B0", alpha=0.8)
    if len(grid) <= 64:
        for g in grid.tolist():
            a.axvline(g, color="#C44E52", lw=0.6, alpha=0.7)
    a.set_title(f"{title} weights + grid of the widest group ({len(grid)} levels)")
    a.set_yscale("log")
    err = (stats["dequantized"] - w).reshape(-1).numpy()
    b.hist(err, bins=200, color="#DD8452")
    b.set_title(f"error · SQNR {stats['sqnr_db']:.1f} dB · {stats['bits_per_weight']:.2f} bits/weight · "
                f"{stats['bytes'] / 1024:.0f} KiB (fp32 {stats['fp32_bytes'] / 1024:.0f})", fontsize=9)
    fig.tight_layout()
    return fig, stats


class QuantExplorer:
    """Pick a layer, scheme, bits and group size → histograms, SQNR and bytes; plus the measured scatter."""

    def __init__(self, model: nn.Module, record: Record | None = None, model_name: str | None = None) -> None:
        import ipywidgets as W

        self.layers = {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        self.record, self.model_name = record, model_name
        self.layer = W.Dropdown(options=list(self.layers), description="layer")
        self.scheme = W.ToggleButtons(options=SCHEMES, value="asymmetric", description="scheme")
        self.bits = W.ToggleButtons(options=[2, 3, 4, 8], value=4, description="bits")
        self.group = W.Dropdown(options=[("per channel", None), ("256", 256), ("128", 128), ("64", 64), ("32", 32)],
                                value=64, description="group")
        self.out = W.Output()
        for control in (self.layer, self.scheme, self.bits, self.group):
            control.observe(lambda _change: self.update(), names="value")
        self.box = W.VBox([W.HBox([self.layer, self.group]), self.scheme, self.bits, self.out])

    def update(self) -> dict[str, Any]:
        from IPython.display import display

        fig, stats = quant_explorer_figure(self.layers[self.layer.value], self.scheme.value, self.bits.value,
                                           self.group.value, title=self.layer.value)
        self.out.clear_output(wait=True)
        with self.out:
            display(fig)
            if self.record is not None:
                sc = scatter(self.record, "weight_bytes", "perplexity", model=self.model_name,
                             title="measured variants: memory vs perplexity")
                display(sc)
                plt.close(sc)
        plt.close(fig)
        return stats

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.box)
        self.update()


# ------------------------------------------------------------------------------------------ KV cache viewer


def kv_pool_figure(snap: dict[str, Any], cols: int = 32) -> Figure:
    """Draw the block pool of one engine snapshot (``LLMEngine.snapshot()``): one cell per block, coloured by
    the request that owns it, hatched when shared, grey when free; the bar inside shows how full it is."""
    import matplotlib.patches as mpatches

    n, bs = snap["num_blocks"], snap["block_size"]
    rows = -(-n // cols)
    fig, ax = plt.subplots(figsize=(min(12, 0.32 * cols + 1), 0.32 * rows + 1.6))
    cmap = plt.get_cmap("tab20")
    held = reserved = 0
    for b in range(n):
        r, c = divmod(b, cols)
        owners = snap["owners"].get(b, [])
        if owners:
            fill = max(0, snap["fill"].get(b, 0))
            held += fill
            reserved += bs
            color = cmap(owners[0] % 20)
            ax.add_patch(mpatches.Rectangle((c, -r), 0.92, 0.92, color=color, alpha=0.35,
                                            hatch="///" if len(owners) > 1 else None))
            ax.add_patch(mpatches.Rectangle((c, -r), 0.92 * fill / bs, 0.92, color=color))
        else:
            ax.add_patch(mpatches.Rectangle((c, -r), 0.92, 0.92, color="#dddddd"))
    ax.set_xlim(-0.2, cols + 0.2)
    ax.set_ylim(-rows + 0.8, 1.1)
    ax.set_aspect("equal")
    ax.axis("off")
    waste = 100 * (reserved - held) / reserved if reserved else 0.0
    ax.set_title(f"step {snap['step']} · running {len(snap['running'])} · waiting {len(snap['waiting'])} · "
                 f"blocks used {len(snap['owners'])}/{n} · waste {waste:.1f}% · preemptions {snap['preemptions']}",
                 fontsize=9)
    fig.tight_layout()
    return fig


class KVCacheViewer:
    """Step through an engine's recorded schedule (``LLM(..., record_history=True)``)."""

    def __init__(self, history: list[dict[str, Any]], cols: int = 32) -> None:
        import ipywidgets as W

        if not history:
            from labkit import LabkitError

            raise LabkitError("history is empty: create the LLM with record_history=True and generate first")
        self.history, self.cols = history, cols
        self.step = W.IntSlider(min=0, max=len(history) - 1, value=0, description="step", continuous_update=False)
        self.play = W.Play(min=0, max=len(history) - 1, interval=400)
        W.jslink((self.play, "value"), (self.step, "value"))
        self.out = W.Output()
        self.step.observe(lambda _c: self.update(), names="value")
        self.box = W.VBox([W.HBox([self.play, self.step]), self.out])

    def update(self) -> dict[str, Any]:
        from IPython.display import display

        snap = self.history[self.step.value]
        fig = kv_pool_figure(snap, self.cols)
        self.out.clear_output(wait=True)
        with self.out:
            display(fig)
            print("scheduled (request, tokens):", snap["scheduled"])
        plt.close(fig)
        return snap

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.box)
        self.update()
