"""What every checker shares: the mismatch it raises, the verdict it returns, and tensor comparison in words."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


class Mismatch(Exception):
    """The learner's function disagrees with the kit's; the message says where and how."""


@dataclass
class Verdict:
    name: str
    ok: bool
    message: str
    fallback: bool  # True when the notebook goes on with the kit's version


def close(got: Any, want: torch.Tensor, what: str, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    if not isinstance(got, torch.Tensor):
        raise Mismatch(f"{what}: expected a tensor, got {type(got).__name__}")
    if tuple(got.shape) != tuple(want.shape):
        raise Mismatch(f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    diff = (got.float() - want.float()).abs()
    bad = diff > atol + rtol * want.float().abs()
    if bad.any():
        i = tuple(int(v) for v in bad.nonzero()[0])
        raise Mismatch(f"{what}: at index {i} you give {got[i].item():.6g}, the kit gives {want[i].item():.6g} "
                       f"({int(bad.sum())} of {bad.numel()} values differ)")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
