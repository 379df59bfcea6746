"""Fixed, offline evaluation and calibration data.

* Text: Python's own ``pydoc_data.topics`` (about 465 KB of English technical prose, on every CPython).
  Topics are assigned to splits by a hash of their name, so the splits never change for a given Python.
* Digits: scikit-learn's bundled 8x8 digits, split 60/20/20 with a fixed seed.
* Sentences: a small set of paired sentences we wrote (``labkit/assets/sentences.txt``) for encoder checks.
"""

from __future__ import annotations

import hashlib
import importlib.resources
from functools import cache, lru_cache
from typing import Any

import torch

from labkit import LabkitError

SPLITS = ("calibration", "evaluation")


def _split_of(topic: str) -> str:
    """Deterministic split: about 1 topic in 4 is held out for evaluation."""
    bucket = int(hashlib.sha256(topic.encode()).hexdigest(), 16) % 4
    return "evaluation" if bucket == 0 else "calibration"


@cache
def text(split: str = "evaluation") -> str:
    """The calibration or evaluation text drawn from ``pydoc_data.topics``."""
    if split not in SPLITS:
        raise LabkitError(f"split={split!r} is not allowed; use one of {SPLITS}")
    from pydoc_data.topics import topics

    parts = [topics[k].strip() for k in sorted(topics) if _split_of(k) == split]
    return "\n\n".join(parts)


def token_windows(tokenizer: Any, split: str = "evaluation", *, window: int = 256, stride: int | None = None,
                  max_windows: int | None = None) -> list[tuple[torch.Tensor, int]]:
    """Tokenised evaluation windows ``(input_ids[1, L], n_scored)`` over the split's text."""
    return windows(_encode(tokenizer, split), window=window, stride=stride, max_windows=max_windows)


def windows(ids: torch.Tensor, *, window: int = 256, stride: int | None = None,
            max_windows: int | None = None) -> list[tuple[torch.Tensor, int]]:
    """Cut a 1-D id tensor into windows ``(input_ids[1, L], n_scored)``.

    Windows of ``window`` tokens end every ``stride`` tokens (at most ``window - 1``); each scores only
    the targets no earlier window scored (its last ``n_scored`` positions), so every token after the
    first is predicted exactly once, with at least ``window - stride`` tokens of context.
    """
    stride = stride or window
    if window < 2:
        raise LabkitError(f"window={window} must be at least 2 tokens")
    if not 0 < stride <= window:
        raise LabkitError(f"stride={stride} must be in 1..window ({window})")
    if max_windows is not None and max_windows < 1:
        raise LabkitError(f"max_windows={max_windows} must be at least 1 (or None for all)")
    out: list[tuple[torch.Tensor, int]] = []
    n = len(ids)
    step = min(stride, window - 1)  # a window of L tokens predicts L - 1 of them
    prev_end, end = 1, min(window, n)  # the first token has no prediction
    while True:
        begin = max(0, end - window)
        out.append((ids[begin:end].unsqueeze(0), end - prev_end))
        prev_end = end
        if end == n or (max_windows is not None and len(out) >= max_windows):
            break
        end = min(end + step, n)
    return out


def _encode(tokenizer: Any, split: str) -> torch.Tensor:
    key = (getattr(tokenizer, "name_or_path", ""), len(tokenizer), split)
    if key not in _ENCODED:
        _ENCODED[key] = torch.tensor(tokenizer(text(split), add_special_tokens=False)["input_ids"])
    return _ENCODED[key]


_ENCODED: dict[tuple, torch.Tensor] = {}


def calibration_batches(tokenizer: Any, n: int = 32, seq_len: int = 256,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """``[n, seq_len]`` token ids from the calibration split (consecutive, non-overlapping), on ``device``."""
    ids = _encode(tokenizer, "calibration")
    if n * seq_len > len(ids):
        raise LabkitError(f"n*seq_len={n * seq_len} exceeds the {len(ids)} calibration tokens")
    return ids[: n * seq_len].reshape(n, seq_len).to(device or "cpu", copy=True)  # never a view of the cache


def digits_splits(
    seed: int = 0, device: torch.device | str | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Digits ``{"train"|"val"|"test": (x[N,1,8,8] in [0,1], y[N])}``, 60/20/20, fixed permutation, on ``device``."""
    splits = _digits_splits(seed)
    if device is None or torch.device(device) == torch.device("cpu"):
        return splits
    return {k: (x.to(device), y.to(device)) for k, (x, y) in splits.items()}


@lru_cache(maxsize=4)
def _digits_splits(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The digits splits on the CPU, built once per seed."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_train, n_val = int(0.6 * len(x)), int(0.2 * len(x))
    parts = {"train": perm[:n_train], "val": perm[n_train:n_train + n_val], "test": perm[n_train + n_val:]}
    return {k: (x[idx], y[idx]) for k, idx in parts.items()}


@lru_cache(maxsize=1)
def sentences() -> list[str]:
    """Our small sentence set for encoder checks (paraphrase pairs first, then singles)."""
    path = importlib.resources.files("labkit").joinpath("assets/sentences.txt")
    return [s for s in path.read_text().splitlines() if s.strip()]


def repeat_to(x: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` rows of ``x`` repeated as often as needed: a timed batch of a fixed size from a small set."""
    if n < 1:
        raise LabkitError(f"n={n}: the batch needs at least one row")
    return x.repeat(-(-n // len(x)), *([1] * (x.dim() - 1)))[:n]
