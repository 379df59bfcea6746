"""Notebook 06b: prompt lookup, the n-gram proposer of speculative decoding, checked against
``labkit.serve.speculative.ngram_propose``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from labkit.exercises._check import Mismatch, each, gen
from labkit.serve.speculative import ngram_propose

NOTEBOOK = "06b"


def _check_ngram_propose(fn: Callable) -> str:
    g = gen(6)
    text = torch.randint(0, 50, (40,), generator=g).tolist()
    copied = text + text[5:17]  # the output starts copying the prompt: lookup should find it
    cases = [("a copy of an earlier passage", copied, 4), ("k longer than what follows the match", copied, 30),
             ("nothing recurs", list(range(20)), 4), ("the latest occurrence wins", [1, 2, 7, 1, 2, 9, 1, 2], 2),
             ("a one-token context", [5], 3), ("random tokens from a small vocabulary",
                                              torch.randint(0, 6, (30,), generator=g).tolist(), 3)]
    for label, context, k in each(cases):
        got = fn(list(context), k)
        want = ngram_propose(list(context), k)
        if not isinstance(got, list) or any(not isinstance(t, int) for t in got):
            raise Mismatch(f"{label}: return a list of token ids (ints); yours is {type(got).__name__}")
        if got != want:
            raise Mismatch(f"{label}: proposed {got[:8]}, expected {want[:8]} (the tokens after the latest earlier "
                           "occurrence of the longest recurring suffix, 4 tokens down to 1)")
    return f"proposals as the kit's; on the copied passage it guesses {ngram_propose(copied, 4)}"


# name: (the kit's function, its checker)
EXERCISES = {"ngram_propose": (ngram_propose, _check_ngram_propose)}
