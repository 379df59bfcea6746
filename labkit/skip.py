"""Which layers a technique leaves alone: the one skip rule quantization and pruning share."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

# lm_head stays as it is by default: in tied language models it *is* the embedding matrix (and bitsandbytes keeps
# it in its dtype too)
DEFAULT_SKIP: tuple[str, ...] = ("lm_head",)


def is_skipped(name: str, skip: Iterable[str]) -> bool:
    """Whether module ``name`` matches a ``skip`` pattern: a glob on its full dotted name, on the name of one of its
    parents (``"features"`` skips ``features.0``), or on a dotted tail (``"lm_head"`` skips ``model.lm_head``,
    ``"*_proj"`` every projection). Components match whole: ``"head"`` does not skip ``lm_head``."""
    parts = name.split(".")
    candidates = [".".join(parts[:i]) for i in range(1, len(parts) + 1)] + \
        [".".join(parts[i:]) for i in range(1, len(parts))]
    return any(fnmatch.fnmatchcase(c, pat) for pat in skip for c in candidates)
