"""Sampling parameters (vLLM-shaped) and the sampler: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from labkit import LabkitError

MIN_TEMPERATURE = 1e-2  # logits / t must stay finite in fp32 (vLLM raises such temperatures to 0.01; the kit refuses)
SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes 64 bits; n > 1 adds i to the seed


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 16
    ignore_eos: bool = False
    seed: int | None = None
    n: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise LabkitError(f"temperature={self.temperature!r} must be >= 0 (0 means greedy)")
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise LabkitError(f"temperature={self.temperature!r} must be 0 (greedy) or at least {MIN_TEMPERATURE}: "
                              "dividing logits by less overflows them to inf")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed <= SEED_MAX):
            raise LabkitError(f"seed={self.seed!r} must be an integer in 0..{SEED_MAX} (torch generators take "
                              "64-bit seeds; sample i of n uses seed + i)")
        if not 0 < self.top_p <= 1:
            raise LabkitError(f"top_p={self.top_p!r} must be in (0, 1]")
        if not isinstance(self.top_k, int) or (self.top_k < 1 and self.top_k != -1):
            raise LabkitError(f"top_k={self.top_k!r} must be -1 (off) or a positive integer")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise LabkitError(f"max_tokens={self.max_tokens!r} must be a positive integer")
        if not isinstance(self.n, int) or self.n < 1:
            raise LabkitError(f"n={self.n!r} must be a positive integer")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampling request draws from: temperature, then top-k, then top-p, on the CPU."""
    logits = logits.float() / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < params.top_p
        keep[0] = True  # the top token always stays (a top_p below fp32's smallest number would keep none)
        probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
    return probs if probs.device.type == "cpu" else probs.cpu()  # CPU generators: the same draw on every device


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick the next token from one row of logits."""
    if params.greedy:
        return int(torch.argmax(logits))
    return int(torch.multinomial(probabilities(logits, params), 1, generator=generator))


def sample_batch(logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> list[int]:
    """The next token of every row of ``logits`` ``[rows, vocab]``, with one device-to-host transfer per step.

    Greedy rows take one batched argmax on the device; rows that sample (seeded CPU generators, so a seed gives
    the same tokens on every device) travel in the same transfer: the greedy ids ride as float32 in front of the
    sampled rows' logits (token ids < 2**24 are exact in float32). Per-row ``int(argmax)`` would sync once a row.
    """
    if not params:  # a step of chunked prefill alone samples nothing
        return []
    greedy = [i for i, p in enumerate(params) if p.greedy]
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    best, rows = _to_host(logits, greedy, sampled)
    out: list[int] = [0] * len(params)
    for j, i in enumerate(greedy):
        out[i] = best[j]
    for j, i in enumerate(sampled):
        out[i] = sample(rows[j], params[i], generators[i])
    return out


def _to_host(logits: torch.Tensor, greedy_rows: list[int], sampled_rows: list[int]
             ) -> tuple[list[int], torch.Tensor | None]:
    """One device-to-host transfer: the argmax of every greedy row, and the logits of every sampled row (CPU)."""
    parts = []
    if greedy_rows:
        parts.append(torch.argmax(logits[greedy_rows], dim=-1).float())
    if sampled_rows:
        parts.append(logits[sampled_rows].float().reshape(-1))
    if not parts:
        return [], None
    host = torch.cat(parts).cpu() if len(parts) > 1 else parts[0].cpu()
    rows = host[len(greedy_rows):].view(len(sampled_rows), -1) if sampled_rows else None
    return host[:len(greedy_rows)].long().tolist(), rows


def verify_batch(logits: torch.Tensor, drafts: list[list[int]], params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> list[list[int]]:
    """Speculative decoding's check, for every sequence of a step: ``logits`` holds ``len(drafts[i]) + 1``
    consecutive rows for sequence ``i`` (the target's next-token logits after its last token and after each guess).
    Returns, per sequence, the guesses kept and the target's own token after them.

    Greedy keeps guesses while they equal the argmax, so the tokens are exactly plain greedy decoding's; sampling
    keeps guess ``d`` with probability ``p(d)`` and otherwise draws from ``p`` without ``d``
    (:func:`labkit.serve.speculative.accept` with a one-hot draft), so the tokens follow ``p`` exactly. As in
    :func:`sample_batch`, one device-to-host transfer a step."""
    from labkit.serve.speculative import accept

    starts = [0]
    for d in drafts:
        starts.append(starts[-1] + len(d) + 1)
    rows = lambda i: range(starts[i], starts[i + 1])  # noqa: E731
    greedy_rows = [r for i, p in enumerate(params) if p.greedy for r in rows(i)]
    sampled_rows = [r for i, p in enumerate(params) if not p.greedy for r in rows(i)]
    ids, dists = _to_host(logits, greedy_rows, sampled_rows)
    best = dict(zip(greedy_rows, ids))
    at = {r: j for j, r in enumerate(sampled_rows)}
    out = []
    for i, (d, p) in enumerate(zip(drafts, params)):
        if p.greedy:
            top = [best[r] for r in rows(i)]
            n_ok = next((j for j, g in enumerate(d) if g != top[j]), len(d))
            out.append([*d[:n_ok], top[n_ok]])
        else:
            probs = torch.stack([probabilities(dists[at[r]], p) for r in rows(i)])
            n_ok, nxt = accept(probs, d, None, greedy=False, gen=generators[i])
            out.append([*d[:n_ok], nxt])
    return out
