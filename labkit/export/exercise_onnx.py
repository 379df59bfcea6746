"""Notebook 04: judging an export's parity, checked against ``labkit.export.parity``."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from labkit.exercises._check import Mismatch, each, gen

NOTEBOOK = "04"


def _kit_parity(reference, output, mask=None) -> dict:
    from labkit.export.onnx import parity

    return parity(reference, output, mask)


PARITY_KEYS = {"max_abs_diff", "worst", "cosine", "within_tolerance"}


def _check_parity(fn: Callable) -> str:
    g = gen(8)
    ref = torch.randn(6, 16, 32, generator=g)
    full = torch.ones(6, 16, dtype=torch.long)
    padded = full.clone()
    padded[2, 10:] = padded[5, 4:] = 0
    garbage = ref.clone()
    garbage[2, 10:] += 50 * torch.randn(6, 32, generator=g)  # padding positions: whatever the runtime left there
    garbage[5, 4:] = 0
    edge = ref.clone()
    big = torch.unravel_index(ref.abs().argmax(), ref.shape)  # a large |ref|: a too-loose rtol would let it pass
    edge[big] += 1e-4 + 1e-3 * ref[big].abs() + 1e-5  # just outside atol + rtol·|ref|
    cases = [("identical", ref.clone(), full), ("small noise", ref + 1e-6 * torch.randn(ref.shape, generator=g), full),
             ("one row flipped", torch.cat([-ref[:1], ref[1:]]), full), ("scaled", ref * 3, full),
             # each token scaled by its own positive factor: every token's cosine is 1, each row's is not
             ("tokens scaled unevenly", ref * (0.1 + torch.rand(6, 16, 1, generator=g) * 4), full),
             ("garbage at padded positions only", garbage, padded), ("one element just outside tolerance", edge, full)]
    hints = {"max_abs_diff": "the largest |reference - output| over the real (mask = 1) positions only",
             "worst": "the index (batch, token, feature) of that largest difference",
             "cosine": "cosine per row — one row per batch item, its real tokens flattened — then the mean",
             "within_tolerance": "every real element within atol + rtol·|reference| (atol 1e-4, rtol 1e-3)"}
    for what, out, mask in each(cases):
        got = fn(ref, out.numpy(), mask.numpy())  # ORT returns numpy arrays: the check must take them
        want = _kit_parity(ref, out, mask)
        if not isinstance(got, dict) or set(got) != PARITY_KEYS:
            raise Mismatch(f"return a dict with exactly the keys {sorted(PARITY_KEYS)}")
        real_diff = (ref - out).abs() * mask[..., None]
        for key in ("max_abs_diff", "cosine", "within_tolerance", "worst"):
            g_, w_ = got[key], want[key]
            if key == "worst":  # any position holding the largest difference will do (ties: all zeros)
                try:
                    same = bool(real_diff[tuple(int(i) for i in g_)] == real_diff.max())
                except (TypeError, IndexError, ValueError):
                    same = False
            elif key == "within_tolerance":
                same = bool(g_) == w_
            else:
                same = math.isclose(float(g_), w_, rel_tol=1e-4, abs_tol=1e-5)
            if not same:
                raise Mismatch(f"{what}: your {key} is {g_!r}, the kit's {w_!r} — {hints[key]}")
    return ("the largest difference, where it is, row cosine and the tolerance verdict, over real tokens only, "
            "from torch tensors or numpy arrays")


# name: (the kit's function, its checker)
EXERCISES = {"parity": (_kit_parity, _check_parity)}
