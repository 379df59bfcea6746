"""ipywidgets explorers. The state → figure logic is a plain function tests drive without a browser;
the widget classes only wire controls to it."""

from __future__ import annotations

from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn

from labkit import LabkitError
from labkit.quant.explore import SCHEMES, grid_of_widest_group, quant_stats
from labkit.results import Record
from labkit.viz.kv import block_tables_figure, kv_pool_figure  # noqa: F401 - re-exported for notebooks
from labkit.viz.plots import new_figure, scatter


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


class Explorer:
    """What every explorer shares: shown in a notebook, it displays its controls and draws once; each watched
    control's change redraws. A subclass builds its controls, calls :meth:`layout` and :meth:`watch`, and
    implements ``update()``, which draws through :meth:`show` and returns the numbers it drew (tests read them)."""

    box: Any
    out: Any

    def layout(self, *rows: Any) -> None:
        """The explorer's box: ``rows`` of controls, then the output area it draws in."""
        import ipywidgets as W

        self.out = W.Output()
        self.box = W.VBox([*rows, self.out])

    def watch(self, *controls: Any, then: Any = None) -> None:
        """Call ``then`` (default: ``update``) whenever one of ``controls`` changes value."""
        for control in controls:
            control.observe(lambda _change: (then or self.update)(), names="value")

    def show(self, *items: Any) -> None:
        """Replace what the output area shows: figures are displayed, strings printed."""
        from IPython.display import display

        self.out.clear_output(wait=True)
        with self.out:
            for item in items:
                if isinstance(item, str):
                    print(item)
                else:
                    display(item)

    def update(self) -> dict[str, Any]:
        raise NotImplementedError

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.box)
        self.update()


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


class KVCacheViewer(Explorer):
    """Step through an engine's recorded schedule (``LLM(..., record_history=True)``).

    With ``rerun(block_size, num_blocks, prefix_caching) -> history`` it also shows those three controls and
    reruns the workload when they change (see :func:`kv_history` for a ready-made ``rerun``).
    """

    def __init__(self, history: list[dict[str, Any]] | None = None, cols: int = 16, rerun=None,
                 block_size: int = 16, num_blocks: int = 24, prefix_caching: bool = False) -> None:
        import ipywidgets as W

        if rerun is None and not history:
            from labkit import LabkitError

            raise LabkitError("history is empty: create the LLM with record_history=True and generate first")
        self.rerun, self.cols = rerun, cols
        self.history = history or rerun(block_size, num_blocks, prefix_caching)
        self.step = W.IntSlider(min=0, max=len(self.history) - 1, value=0, description="step",
                                continuous_update=False)
        self.play = W.Play(min=0, max=len(self.history) - 1, interval=400)
        W.jslink((self.play, "value"), (self.step, "value"))
        self.watch(self.step)
        rows = [W.HBox([self.play, self.step])]
        if rerun is not None:
            self.block_size = W.Dropdown(options=[1, 4, 8, 16, 32], value=block_size, description="block_size")
            self.num_blocks = W.IntSlider(min=8, max=256, value=num_blocks, description="num_blocks",
                                          continuous_update=False)
            self.prefix = W.Checkbox(value=prefix_caching, description="prefix caching")
            self.watch(self.block_size, self.num_blocks, self.prefix, then=self.reload)
            rows.insert(0, W.HBox([self.block_size, self.num_blocks, self.prefix]))
        self.layout(*rows)

    def reload(self) -> list[dict[str, Any]]:
        """Rerun the workload with the current controls and go back to step 0."""
        try:
            self.history = self.rerun(self.block_size.value, self.num_blocks.value, self.prefix.value)
        except ValueError as exc:  # e.g. a pool too small for one request
            self.show(f"cannot run: {exc}")
            return []
        self.step.max = self.play.max = len(self.history) - 1
        self.step.value = 0
        self.update()
        return self.history

    def update(self) -> dict[str, Any]:
        snap = self.history[min(self.step.value, len(self.history) - 1)]
        self.show(block_tables_figure(snap, self.cols), f"scheduled (request, tokens): {snap['scheduled']} · "
                  f"prefix-hit blocks so far: {snap.get('prefix_hit_blocks', 0)}")
        return snap


class TemperatureExplorer(Explorer):
    """A temperature slider over real examples → the teacher's softened distribution, its entropy, and the
    measured accuracy of the KD student trained at the nearest temperature (from the record)."""

    def __init__(self, teacher: nn.Module, images: torch.Tensor, labels: torch.Tensor, record: Record | None = None,
                 n_examples: int = 20) -> None:
        import ipywidgets as W

        self.images, self.labels, self.record = images[:n_examples], labels[:n_examples], record
        with torch.no_grad():
            self.logits = teacher(self.images)
        self.temperature = W.FloatLogSlider(value=4, base=2, min=-1, max=4, step=0.25, description="T",
                                            continuous_update=False)
        self.example = W.IntSlider(value=0, min=0, max=len(self.images) - 1, description="example")
        self.layout(W.HBox([self.example, self.temperature]))
        self.watch(self.temperature, self.example)

    def update(self) -> dict[str, Any]:
        from labkit.viz.distill import temperature_explorer_figure

        i = self.example.value
        fig, stats = temperature_explorer_figure(self.images[i], self.logits[i], int(self.labels[i]),
                                                 self.temperature.value, self.record)
        self.show(fig)
        return stats


def fusion_figure(lat: dict[str, dict[str, Any]], rows: int) -> Figure:
    """Eager vs fused latency bars (median, whiskers min–max) with the honest verdict as the title."""
    from labkit.measure import difference

    fig = new_figure((5.5, 2.5))
    ax = fig.subplots()
    names = list(lat)
    med = [lat[n]["latency_ms_median"] for n in names]
    err = [[m - lat[n]["latency_ms_min"] for n, m in zip(names, med)],
           [lat[n]["latency_ms_max"] - m for n, m in zip(names, med)]]
    ax.barh(names, med, xerr=err, color=["#4C72B0", "#55A868"])
    ax.set_xlabel("ms (median; whiskers min–max)")
    ax.set_title(f"{rows} x 1536: " + difference(lat["fused"], lat["eager"], names=("fused", "eager")), fontsize=8)
    fig.tight_layout()
    return fig


class FusionExplorer(Explorer):
    """A rows slider → eager vs fused bias+GELU, timed live (each shape compiles once, then is cached)."""

    def __init__(self, options: tuple[int, ...] = (64, 256, 1024, 4096), value: int = 1024) -> None:
        import ipywidgets as W

        self.rows = W.SelectionSlider(options=list(options), value=value, description="rows",
                                      continuous_update=False)
        self.layout(self.rows)
        self.watch(self.rows)

    def update(self) -> dict[str, Any]:
        from labkit.experiments.tensorrt import bias_gelu_timing

        lat = bias_gelu_timing(self.rows.value)
        self.show(fusion_figure(lat, self.rows.value))
        return lat


class SparsityExplorer(Explorer):
    """A sparsity slider and a method choice over a precomputed sweep (``labkit.experiments.pruning.sweep``) →
    accuracy, params, latency, and the weight histogram with the pruned region shaded."""

    def __init__(self, model: nn.Module, sweep: list[dict[str, Any]]) -> None:
        import ipywidgets as W

        from labkit.viz.prune import all_weights

        self.sweep, self.weights = sweep, all_weights(model)
        levels = sorted({r["sparsity"] for r in sweep})
        self.sparsity = W.SelectionSlider(options=[(f"{s:.0%}", s) for s in levels], value=levels[len(levels) // 2],
                                          description="sparsity", continuous_update=False)
        self.method = W.ToggleButtons(options=list(dict.fromkeys(r["method"] for r in sweep)), description="method")
        self.layout(W.HBox([self.sparsity, self.method]))
        self.watch(self.sparsity, self.method)

    def update(self) -> dict[str, Any]:
        from labkit.viz.prune import sparsity_explorer_figure

        fig, row = sparsity_explorer_figure(self.sweep, self.method.value, self.sparsity.value, self.weights)
        self.show(fig)
        return row


class GraphExplorer(Explorer):
    """Pick an ONNX graph (exported, fused, quantized ...) and slide along it → a block of its nodes drawn, with the
    graph's operator counts: fusion and quantization become visible node by node."""

    def __init__(self, graphs: dict[str, Any], n: int = 14) -> None:
        import ipywidgets as W
        import onnx

        from labkit.viz.graph import SKIP

        self.protos = {k: onnx.load(str(v), load_external_data=False) for k, v in graphs.items()}
        self.nodes = {k: [nd for nd in p.graph.node if nd.op_type not in SKIP] for k, p in self.protos.items()}
        self.n = n
        self.graph = W.Dropdown(options=list(graphs), description="graph")
        self.start = W.IntSlider(value=0, min=0, max=max(len(v) for v in self.nodes.values()) - 1, step=1,
                                 description="from node", continuous_update=False)
        self.layout(W.HBox([self.graph, self.start]))
        self.watch(self.graph, self.start)

    def update(self) -> dict[str, Any]:
        from collections import Counter

        from labkit.viz.graph import draw_block

        nodes = self.nodes[self.graph.value]
        start = min(self.start.value, max(len(nodes) - self.n, 0))
        block = nodes[start:start + self.n]
        fig = draw_block(block, f"{self.graph.value}: compute nodes {start}–{start + len(block) - 1} of {len(nodes)}")
        counts = Counter(nd.op_type for nd in self.protos[self.graph.value].graph.node)
        self.show(fig, f"all nodes: {sum(counts.values())} · "
                  + ", ".join(f"{k} {v}" for k, v in counts.most_common(8)))
        return {"start": start, "ops": [nd.op_type for nd in block], "total_nodes": sum(counts.values())}


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
        from labkit.viz.tradeoff import tradeoff_figure

        try:
            fig, info = tradeoff_figure(self.rows, model=self.model.value, metric=self.metric.value,
                                        cost=self.cost.value, within=self.within.value, hardware=self.hardware.value)
        except LabkitError as exc:  # a combination without data is a message, not a crash
            self.show(str(exc))
            return {"choice": None, "reason": str(exc)}
        self.show(fig, info["reason"], *(["recipe: " + " → ".join(info["recipe"])] if info["recipe"] else []))
        return info
