"""Draw a block of an ONNX graph: one box per node, arrows for the tensors between them, laid out by depth.

Enough to *see* fusion: the same stretch of a transformer layer before (Add → LayerNormalization, MatMul → Add →
Erf/Mul chains) and after ONNX Runtime's optimizer (SkipLayerNormalization, BiasGelu)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from labkit.viz.plots import new_figure
from labkit.viz.widgets import Explorer

COLOURS = {"MatMul": "#4C72B0", "FusedMatMul": "#4C72B0", "Add": "#DD8452", "LayerNormalization": "#55A868",
           "SkipLayerNormalization": "#2CA02C", "BiasGelu": "#C44E52", "Erf": "#E377C2", "Mul": "#8172B3",
           "Div": "#8172B3", "Softmax": "#937860", "DynamicQuantizeLinear": "#17BECF",
           "MatMulInteger": "#1F77B4", "QuantizeLinear": "#17BECF", "DequantizeLinear": "#BCBD22"}
SKIP = {"Constant", "Shape", "Gather", "Unsqueeze", "Concat", "Reshape", "Slice", "Squeeze", "Cast", "Identity"}


def graph_block(model: Any, start_op: str = "Softmax", n: int = 14, skip: set[str] = SKIP) -> list:
    """The ``n`` compute nodes (shape plumbing skipped) right after the first node whose op contains ``start_op``
    (after the first attention Softmax: attention output, residual + layer norm, the MLP with its GELU)."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False) if isinstance(model, (str, Path)) else model
    nodes = [nd for nd in proto.graph.node if nd.op_type not in skip]
    first = next((i for i, nd in enumerate(nodes) if start_op in nd.op_type), 0)
    return nodes[first + 1:first + 1 + n]


def draw_block(nodes: list, title: str, ax=None):
    """Boxes by dependency depth (producers above consumers) with arrows along the tensors inside the block."""
    fig = None
    if ax is None:
        fig = new_figure((4.2, 0.55 * len(nodes) + 1))
        ax = fig.subplots()
    produced = {out: i for i, nd in enumerate(nodes) for out in nd.output}
    depth: list[int] = []
    for nd in nodes:
        parents = [produced[x] for x in nd.input if x in produced]
        depth.append(1 + max((depth[p] for p in parents), default=-1))
    cols: dict[int, int] = {}
    pos = []
    for d in depth:
        pos.append((1.7 * cols.get(d, 0), -d))
        cols[d] = cols.get(d, 0) + 1
    for i, nd in enumerate(nodes):
        for x in nd.input:
            if x in produced:
                (x0, y0), (x1, y1) = pos[produced[x]], pos[i]
                ax.annotate("", xy=(x1, y1 + 0.25), xytext=(x0, y0 - 0.25),
                            arrowprops={"arrowstyle": "->", "color": "gray", "lw": 0.8})
    for (x, y), nd in zip(pos, nodes):
        ax.text(x, y, nd.op_type, ha="center", va="center", fontsize=8, color="white",
                bbox={"boxstyle": "round,pad=0.3", "fc": COLOURS.get(nd.op_type, "#7F7F7F"), "ec": "none"})
    ax.set_xlim(-1.0, 1.7 * max(cols.values(), default=1) - 0.7)
    ax.set_ylim(min((p[1] for p in pos), default=0) - 0.8, 0.8)
    ax.axis("off")
    ax.set_title(title, fontsize=9)
    return fig if fig is not None else ax.figure


def before_after(before: Any, after: Any, *, start_op: str = "Softmax", n: int = 14):
    """Two blocks side by side: the exported graph and the optimised one, from the same starting op."""
    fig = new_figure((9, 0.45 * n + 1.5))
    a1, a2 = fig.subplots(1, 2)
    b, a = graph_block(before, start_op, n), graph_block(after, start_op, n)
    draw_block(b, f"exported: {len(b)} nodes shown", a1)
    draw_block(a, f"after fusion: the same stretch, {len(a)} nodes shown", a2)
    fig.tight_layout()
    return fig


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
        from labkit.export.experiment_tensorrt import bias_gelu_timing

        lat = bias_gelu_timing(self.rows.value)
        self.show(fusion_figure(lat, self.rows.value))
        return lat


class GraphExplorer(Explorer):
    """Pick an ONNX graph (exported, fused, quantized ...) and slide along it → a block of its nodes drawn, with the
    graph's operator counts: fusion and quantization become visible node by node."""

    def __init__(self, graphs: dict[str, Any], n: int = 14) -> None:
        import ipywidgets as W
        import onnx

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

        nodes = self.nodes[self.graph.value]
        start = min(self.start.value, max(len(nodes) - self.n, 0))
        block = nodes[start:start + self.n]
        fig = draw_block(block, f"{self.graph.value}: compute nodes {start}–{start + len(block) - 1} of {len(nodes)}")
        counts = Counter(nd.op_type for nd in self.protos[self.graph.value].graph.node)
        self.show(fig, f"all nodes: {sum(counts.values())} · "
                  + ", ".join(f"{k} {v}" for k, v in counts.most_common(8)))
        return {"start": start, "ops": [nd.op_type for nd in block], "total_nodes": sum(counts.values())}
