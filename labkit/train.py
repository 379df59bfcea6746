"""One small training loop for teacher, scratch student and KD student alike.

``train(model, data, loss_fn, ...)`` shuffles ``data`` (a tuple of tensors sharing the first dimension) with a
fixed seed, calls ``loss_fn(model, batch) -> loss`` on each mini-batch, steps Adam, evaluates ``eval_fn(model)``
after every epoch and returns the :class:`History` for plotting. What makes a run "KD" is only its ``loss_fn``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from labkit import LabkitError


@dataclass
class History:
    epochs: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    metric: list[float] = field(default_factory=list)
    steps: int = 0
    examples: int = 0

    @property
    def final(self) -> float | None:
        return self.metric[-1] if self.metric else None


def train(model: nn.Module, data: tuple[torch.Tensor, ...], loss_fn: Callable[[nn.Module, tuple], torch.Tensor], *,
          epochs: int = 10, batch_size: int = 64, lr: float = 3e-3, seed: int = 0, max_steps: int | None = None,
          eval_fn: Callable[[nn.Module], float] | None = None, params=None, desc: str = "train",
          device: torch.device | str | None = None, progress: bool = False) -> History:
    """Train ``model`` in place; deterministic for a given ``seed`` on CPU.

    ``device``: where the model and every batch go (default: where the model's parameters already are); the data
    tensors are moved there once, so a GPU run never trains on the CPU by accident."""
    if epochs < 1 or batch_size < 1:
        raise LabkitError(f"epochs={epochs} and batch_size={batch_size} must be positive")
    n = len(data[0])
    if any(len(t) != n for t in data):
        raise LabkitError(f"data tensors have different lengths: {[len(t) for t in data]}")
    if device is not None:
        model.to(device)
    dev = next(model.parameters()).device
    data = tuple(t.to(dev) for t in data)
    if max_steps is not None:  # the bar and the loop need only as many epochs as the steps fill
        epochs = min(epochs, -(-max_steps // -(-n // batch_size)))
    # seeded here and restored after: training is reproducible without changing the caller's global RNG
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(params if params is not None else model.parameters(), lr=lr)
        hist = History()
        by_step = max_steps is not None  # a step budget: the bar counts steps, else epochs
        bar = tqdm(total=max_steps if by_step else epochs, desc=desc, unit="step" if by_step else "epoch",
                   disable=not progress)
        for epoch in range(epochs):
            model.train()
            perm = torch.randperm(n, generator=gen)
            total, batches = 0.0, 0
            for i in range(0, n, batch_size):
                if max_steps is not None and hist.steps >= max_steps:
                    break
                batch = tuple(t[perm[i:i + batch_size]] for t in data)
                loss = loss_fn(model, batch)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total, batches = total + float(loss.detach()), batches + 1
                hist.steps += 1
                hist.examples += len(batch[0])
                if by_step:
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            model.eval()
            hist.epochs.append(epoch + 1)
            hist.train_loss.append(total / max(batches, 1))
            if not by_step:
                bar.update(1)
            if eval_fn is not None:
                with torch.no_grad():
                    hist.metric.append(float(eval_fn(model)))
                bar.set_postfix(loss=f"{hist.train_loss[-1]:.3f}", metric=f"{hist.metric[-1]:.4g}")
            if max_steps is not None and hist.steps >= max_steps:
                break
        bar.close()
        return hist
