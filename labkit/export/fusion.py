"""Operator fusion from scratch, on a graph small enough to read: what ONNX Runtime's BiasGelu fusion does.

A graph here is a list of nodes in topological order, each ``{"op", "inputs", "output", "attrs"}``, plus the
names of its constants (initializers, with their shapes) and its outputs. :func:`graph_of` reads an ONNX file
into that form. Two passes, each a pattern match and a rewrite:

* :func:`collapse_gelu` — the exporter writes exact GELU as five nodes, ``y / √2 → Erf → + 1 → × 0.5 → × y``;
  they become one ``Gelu`` node (ORT's GeluFusion).
* :func:`fuse_bias_gelu` — a bias ``Add`` whose only consumer is that ``Gelu`` becomes one ``BiasGelu``: the sum
  is never written to memory and read back (ORT's BiasGeluFusion). Notebook 05's exercise writes this pass.

A rewrite is only legal when nothing else reads the intermediate values it removes; both passes check that.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

Node = dict[str, Any]


def graph_of(path: str | Path) -> tuple[list[Node], dict[str, tuple[int, ...]], dict[str, float], list[str]]:
    """``(nodes, constants, scalars, graph_outputs)`` of an ONNX file: ``constants`` maps every initializer to
    its shape, ``scalars`` the one-element ones to their value (a pattern needs to see √2, 1 and 0.5)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    constants, scalars = {}, {}
    for init in model.graph.initializer:
        constants[init.name] = tuple(init.dims)
        if math.prod(init.dims) == 1:
            scalars[init.name] = float(numpy_helper.to_array(init).reshape(-1)[0])
    nodes = [{"op": n.op_type, "inputs": list(n.input), "output": n.output[0],
              "attrs": {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}} for n in model.graph.node]
    return nodes, constants, scalars, [o.name for o in model.graph.output]


def consumers(nodes: list[Node], graph_outputs: list[str] = ()) -> Counter:
    """How many times each value is read (a graph output counts as a reader)."""
    count = Counter(i for n in nodes for i in n["inputs"])
    count.update(graph_outputs)
    return count


def _producers(nodes: list[Node]) -> dict[str, Node]:
    return {n["output"]: n for n in nodes}


def collapse_gelu(nodes: list[Node], scalars: dict[str, float], graph_outputs: list[str] = ()) -> list[Node]:
    """Replace every exact-GELU chain ``Mul(y, Mul(0.5, Add(Erf(Div(y, √2)), 1)))`` by ``Gelu(y)``."""
    prod, reads = _producers(nodes), consumers(nodes, graph_outputs)

    def const(name: str, value: float) -> bool:
        return name in scalars and math.isclose(scalars[name], value, rel_tol=1e-3)

    def other(node: Node, name: str) -> str | None:
        rest = [i for i in node["inputs"] if i != name]
        return rest[0] if len(rest) == 1 else None

    drop, replace = set(), {}
    for erf in (n for n in nodes if n["op"] == "Erf"):
        div = prod.get(erf["inputs"][0])
        if not div or div["op"] != "Div" or not const(div["inputs"][1], math.sqrt(2)):
            continue
        y = div["inputs"][0]
        add = [n for n in nodes if n["op"] == "Add" and erf["output"] in n["inputs"]]
        if len(add) != 1 or not const(other(add[0], erf["output"]) or "", 1.0):
            continue
        half = [n for n in nodes if n["op"] == "Mul" and add[0]["output"] in n["inputs"]]
        if len(half) != 1 or not const(other(half[0], add[0]["output"]) or "", 0.5):
            continue
        last = [n for n in nodes if n["op"] == "Mul" and half[0]["output"] in n["inputs"]]
        if len(last) != 1 or other(last[0], half[0]["output"]) != y:
            continue
        chain = [div, erf, add[0], half[0]]
        if any(reads[n["output"]] != 1 for n in chain):
            continue  # an intermediate is read elsewhere: it must stay
        drop.update(id(n) for n in chain)
        replace[id(last[0])] = {"op": "Gelu", "inputs": [y], "output": last[0]["output"], "attrs": {}}
    return [replace.get(id(n), n) for n in nodes if id(n) not in drop]


def fuse_bias_gelu(nodes: list[Node], constants: dict[str, tuple[int, ...]],
                   graph_outputs: list[str] = ()) -> list[Node]:
    """Replace ``Add(x, bias) → Gelu`` by ``BiasGelu(x, bias)`` where ``bias`` is a 1-D constant, ``x`` is not a
    constant, the sum is read by that Gelu alone (and is no graph output), and the Gelu is exact (no
    ``approximate="tanh"``: that one is FastGelu)."""
    reads, prod = consumers(nodes, graph_outputs), _producers(nodes)
    drop, replace = set(), {}
    for gelu in (n for n in nodes if n["op"] == "Gelu"):
        add = prod.get(gelu["inputs"][0])
        if add is None or add["op"] != "Add" or reads[add["output"]] != 1:
            continue
        if gelu.get("attrs", {}).get("approximate", "none") not in ("none", b"none"):
            continue
        bias = [i for i in add["inputs"] if len(constants.get(i, ())) == 1]
        x = [i for i in add["inputs"] if i not in constants]
        if len(bias) != 1 or len(x) != 1:
            continue
        drop.add(id(add))
        replace[id(gelu)] = {"op": "BiasGelu", "inputs": [x[0], bias[0]], "output": gelu["output"], "attrs": {}}
    return [replace.get(id(n), n) for n in nodes if id(n) not in drop]


def node_counts(nodes: list[Node]) -> Counter:
    """Nodes per operator of a node list (the pass's own graph form; :func:`labkit.export.onnx.op_counts` reads
    a model)."""
    return Counter(n["op"] for n in nodes)
