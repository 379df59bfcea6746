"""Notebook 01d: the paper arithmetic behind "140 GB → 35 GB", checked against ``labkit.quant.projection``."""

from __future__ import annotations

from collections.abc import Callable

from labkit.exercises._check import Mismatch, each
from labkit.quant.projection import BITS, LLAMA_3_70B, linear_params

NOTEBOOK = "01d"


def _check_linear_params(fn: Callable) -> str:
    cases = [("Llama 3 8B (GQA: 8 KV heads of 32)", (4096, 14336, 32, 32, 8)),
             ("Llama 3 70B (GQA: 8 KV heads of 64)", (8192, 28672, 80, 64, 8)),
             ("SmolLM2-135M (3 KV heads of 9)", (576, 1536, 30, 9, 3)),
             ("multi-head attention (every head its own K and V)", (1024, 4096, 12, 16, 16))]
    for label, shape in each(cases):
        got, want = fn(*shape), linear_params(*shape)
        if not isinstance(got, int) or got != want:
            raise Mismatch(f"{label}: {got!r} linear weights, expected {want:,} — per layer q and o are hidden x "
                           "hidden, k and v hidden x (kv_heads x head_dim), gate, up and down hidden x intermediate")
    big = LLAMA_3_70B.linear_params
    return (f"Llama 3 70B has {big / 1e9:.1f} B linear weights: {big * BITS['nf4-dq'] / 8 / 1e9:.1f} GB at NF4 with "
            f"double quantization, before the 16-bit embeddings")


# name: (the kit's function, its checker)
EXERCISES = {"linear_params": (linear_params, _check_linear_params)}
