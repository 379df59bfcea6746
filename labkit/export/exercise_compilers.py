"""Notebook 05: the bias+GELU fusion pass, checked against ``labkit.export.fusion``."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from labkit.exercises._check import Mismatch, each

NOTEBOOK = "05"


def _kit_fuse_bias_gelu(nodes: list[dict], constants: dict[str, tuple], graph_outputs: list[str]) -> list[dict]:
    from labkit.export.fusion import fuse_bias_gelu

    return fuse_bias_gelu(nodes, constants, graph_outputs)


def _n(op: str, inputs: list[str], output: str, **attrs: Any) -> dict:
    return {"op": op, "inputs": inputs, "output": output, "attrs": attrs}


def _fusion_cases() -> list[tuple[str, list[dict], dict[str, tuple], list[str]]]:
    c = {"W": (8, 8), "W2": (8, 8), "b": (8,), "b2": (8,), "B": (8, 8)}
    layer = lambda i, bias="b": [_n("MatMul", [f"x{i}", "W"], f"m{i}"), _n("Add", [f"m{i}", bias], f"y{i}"),  # noqa: E731
                                 _n("Gelu", [f"y{i}"], f"z{i}"), _n("MatMul", [f"z{i}", "W2"], f"x{i + 1}")]
    return [
        ("one bias Add feeding a Gelu", layer(0), c, ["x1"]),
        ("the bias on the left of the Add", [_n("Add", ["b", "m"], "y"), _n("Gelu", ["y"], "z")], c, ["z"]),
        ("the sum is read by another node too", layer(0) + [_n("Add", ["y0", "x1"], "r")], c, ["r"]),
        ("a residual Add: no constant, no bias", [_n("Add", ["m", "r"], "y"), _n("Gelu", ["y"], "z")], c, ["z"]),
        ("a 2-D constant is not a bias", layer(0, bias="B"), c, ["x1"]),
        ("the tanh Gelu is FastGelu, not BiasGelu", [_n("Add", ["m", "b"], "y"),
                                                     _n("Gelu", ["y"], "z", approximate="tanh")], c, ["z"]),
        ("the sum is a graph output", layer(0), c, ["x1", "y0"]),
        ("two layers, two fusions", layer(0) + layer(1, bias="b2"), c, ["x2"]),
    ]


def _canonical(nodes: Any) -> list[tuple]:
    return [(n["op"], tuple(n["inputs"]), n["output"]) for n in nodes]


def _check_fuse_bias_gelu(fn: Callable) -> str:
    for what, nodes, consts, outs in each(_fusion_cases()):
        got = fn(copy.deepcopy(nodes), dict(consts), list(outs))
        want = _kit_fuse_bias_gelu(copy.deepcopy(nodes), consts, outs)
        if not isinstance(got, list) or not all(isinstance(n, dict) and {"op", "inputs", "output"} <= n.keys()
                                                for n in got):
            raise Mismatch(f"{what}: return the new list of nodes (dicts with op, inputs, output)")
        produced = {n["output"] for n in nodes}
        seen = set()
        for n in got:  # topological order: every input exists before it is read
            missing = [i for i in n["inputs"] if i in produced and i not in seen]
            if missing:
                raise Mismatch(f"{what}: node {n['op']} reads {missing} before any node writes it — keep the "
                               "nodes in topological order")
            seen.add(n["output"])
        if sorted(_canonical(got)) != sorted(_canonical(want)):
            g_ops = sorted(n["op"] for n in got)
            w_ops = sorted(n["op"] for n in want)
            raise Mismatch(f"{what}: your graph has {g_ops}, the kit's {w_ops}"
                           + ("" if g_ops != w_ops else " (same ops, different wiring: BiasGelu takes (x, bias) "
                              "and writes the Gelu's output name)"))
    return ("Add(x, bias) → exact Gelu becomes BiasGelu only where that is legal: a 1-D constant bias, a sum "
            "nobody else reads, not a graph output, not the tanh form")


# name: (the kit's function, its checker)
EXERCISES = {"fuse_bias_gelu": (_kit_fuse_bias_gelu, _check_fuse_bias_gelu)}
