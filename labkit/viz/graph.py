"""Draw a block of an ONNX graph: one box per node, arrows for the tensors between them, laid out by depth.

Enough to *see* fusion: the same stretch of a transformer layer before (Add → LayerNormalization, MatMul → Add →
Erf/Mul chains) and after ONNX Runtime's optimizer (SkipLayerNormalization, BiasGelu)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from labkit.viz.plots import new_figure

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
