"""Speculative decoding: a cheap proposer guesses ``k`` tokens, the target model checks them all in one forward.

A decode step of a small model on a CPU (or of any model at batch 1 on a GPU) is bound by reading the weights, not
by arithmetic, so verifying ``k + 1`` positions costs little more than one. Each round:

1. the proposer drafts ``d_1..d_k``: **n-gram prompt lookup** (find the last few tokens earlier in the context and
   propose what followed them there; free, and good when the output copies the input) or a **draft model** (a
   smaller model with the same vocabulary, e.g. the layer-dropped student of notebook 03);
2. the target runs ``[last token, d_1..d_k]`` at once (:meth:`StaticDecoder.forward` with ``every=True``) and has its
   own next-token distribution ``p_i`` after each prefix;
3. **greedy**: keep the drafts while ``d_i == argmax p_{i-1}``, then add the target's own token — exactly the tokens
   plain greedy decoding gives (tests check token identity). **Sampling**: keep ``d_i`` with probability
   ``min(1, p(d_i) / q(d_i))`` (``q``: the draft's distribution, one-hot for n-gram), else sample the replacement from
   ``max(0, p - q)`` renormalised and stop — the output follows the target's distribution exactly (Leviathan et al.,
   2023, arXiv:2211.17192; Chen et al., 2023, arXiv:2302.01318);
4. rejected positions are rewound out of both caches (:meth:`StaticDecoder.rewind`).

The configuration is shaped like vLLM's ``speculative_config``: ``{"method": "ngram", "num_speculative_tokens": 4,
"prompt_lookup_max": 4, "prompt_lookup_min": 1}`` or ``{"method": "draft_model", "model": <a model>,
"num_speculative_tokens": 4}``. Batch 1 only: this is the measuring tool of notebook 06, not the serving engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from labkit import LabkitError

if TYPE_CHECKING:  # labkit.decode imports the serving package, whose engine imports this module's math
    from labkit.decode import StaticDecoder

METHODS = ("ngram", "draft_model")


@dataclass
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    model: Any = None  # the draft model (method "draft_model"): same vocabulary as the target

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LabkitError(f"method={self.method!r} is not a speculative method here; allowed: {', '.join(METHODS)}")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LabkitError(f"{name}={value!r} must be a positive integer")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise LabkitError(f"prompt_lookup_min={self.prompt_lookup_min} is above "
                              f"prompt_lookup_max={self.prompt_lookup_max}")
        if (self.method == "draft_model") != (self.model is not None):
            raise LabkitError("model= is the draft model: give one with method='draft_model' and only then")

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> SpeculativeConfig:
        """From vLLM's dict shape; an unknown key is an error that lists the known ones."""
        known = ("method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "model")
        unknown = sorted(set(spec) - set(known))
        if unknown:
            raise LabkitError(f"speculative_config has {', '.join(map(repr, unknown))}; known keys: {', '.join(known)}")
        return cls(**spec)


@dataclass
class SpeculativeResult:
    tokens: list[int]
    rounds: int = 0  # target forwards after the prefill
    proposed: int = 0
    accepted: int = 0
    per_round: list[int] = field(default_factory=list)  # drafts accepted in each round

    @property
    def acceptance_rate(self) -> float:
        """Share of proposed tokens the target kept."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_round(self) -> float:
        """New tokens per target forward (1.0 is plain decoding)."""
        return len(self.tokens) / self.rounds if self.rounds else 0.0


def ngram_propose(context: list[int], k: int, n_max: int = 4, n_min: int = 1) -> list[int]:
    """Prompt lookup: for ``n`` from ``n_max`` down to ``n_min``, find the latest earlier occurrence of the last ``n``
    tokens and propose the (up to) ``k`` tokens that followed it; ``[]`` if no suffix recurs."""
    for n in range(min(n_max, len(context) - 1), n_min - 1, -1):
        tail = context[-n:]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start:start + n] == tail:
                return context[start + n:start + n + k]
    return []


def accept(p: torch.Tensor, drafts: list[int], q: torch.Tensor | None, greedy: bool,
            gen: torch.Generator | None) -> tuple[int, int]:
    """How many drafts to keep and the token that follows them. ``p [k+1, vocab]``: the target's distributions
    (logits when greedy); ``q [k, vocab]``: the draft's (None: one-hot on the drafts)."""
    for i, d in enumerate(drafts):
        if greedy:
            t = int(p[i].argmax())
            if t != d:
                return i, t
            continue
        qd = 1.0 if q is None else float(q[i, d])
        if torch.rand((), generator=gen).item() < min(1.0, float(p[i, d]) / max(qd, 1e-30)):
            continue
        residual = p[i].clone()
        if q is None:
            residual[d] = 0
        else:
            residual = (residual - q[i]).clamp_min(0)
        if residual.sum() <= 0:  # p == q: any token of p is a fair replacement
            residual = p[i]
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=gen))
    last = p[len(drafts)]
    return len(drafts), int(last.argmax()) if greedy else int(torch.multinomial(last, 1, generator=gen))


def generate(target: StaticDecoder, prompt: list[int], max_new_tokens: int, config: SpeculativeConfig | dict,
             temperature: float = 0.0, seed: int | None = None, draft: StaticDecoder | None = None
             ) -> SpeculativeResult:
    """``max_new_tokens`` tokens after ``prompt`` (token ids), speculatively. ``temperature=0`` is greedy (the same
    tokens as ``target.generate``); above 0, rejection sampling. ``draft``: a ready :class:`StaticDecoder` over
    ``config.model`` (built here when not given; reuse one across calls to keep its weights' stacked copy)."""
    cfg = SpeculativeConfig.from_dict(config) if isinstance(config, dict) else config
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise LabkitError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    if not temperature >= 0:
        raise LabkitError(f"temperature={temperature!r} must be >= 0 (0: greedy)")
    if not prompt:
        raise LabkitError("prompt is empty; give at least one token")
    if target.batch != 1:
        raise LabkitError(f"the target decoder has batch={target.batch}; speculative decoding here is batch 1")
    need = len(prompt) + max_new_tokens + cfg.num_speculative_tokens
    if need > target.max_len:
        raise LabkitError(f"prompt + max_new_tokens + num_speculative_tokens = {need} is past the target's "
                          f"max_len={target.max_len}")
    if cfg.method == "draft_model" and draft is None:
        from labkit.decode import StaticDecoder

        draft = StaticDecoder(cfg.model, max_len=target.max_len, dtype=target.dtype)
    greedy = temperature == 0
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    # sampling draws on the CPU (one generator, whatever the device): the distributions come over once a round
    dist = (lambda x: x) if greedy else (lambda x: torch.softmax(x.float().cpu() / temperature, -1))  # noqa: E731
    ids = lambda toks: torch.tensor([toks], device=target.device)  # noqa: E731

    target.reset()
    p_next = dist(target.forward(ids(prompt))[0].float())
    context, out = list(prompt), SpeculativeResult([])
    first = int(p_next.argmax()) if greedy else int(torch.multinomial(p_next, 1, generator=gen))
    context.append(first)
    out.tokens.append(first)
    if draft is not None:
        draft.reset()
        draft.forward(ids(prompt))
    while len(out.tokens) < max_new_tokens:
        k = min(cfg.num_speculative_tokens, max_new_tokens - len(out.tokens) - 1)
        drafts, q = _propose(cfg, context, k, draft, dist, greedy, gen, ids)
        base = target.pos  # the cache holds context[:-1]; context[-1] runs now with the drafts
        logits = target.forward(ids([context[-1], *drafts]), every=True)[0].float()
        n_ok, nxt = accept(dist(logits), drafts, q, greedy, gen)
        kept = [*drafts[:n_ok], nxt]
        target.rewind(base + 1 + n_ok)
        if draft is not None:
            draft.rewind(min(draft.pos, base + 1 + n_ok))
        out.rounds += 1
        out.proposed += len(drafts)
        out.accepted += n_ok
        out.per_round.append(n_ok)
        context += kept
        out.tokens += kept
    out.tokens = out.tokens[:max_new_tokens]
    return out


def _propose(cfg: SpeculativeConfig, context: list[int], k: int, draft: StaticDecoder | None, dist, greedy: bool,
             gen: torch.Generator | None, ids) -> tuple[list[int], torch.Tensor | None]:
    """``k`` (or fewer) drafts, and the draft model's distribution for each (None for n-gram: one-hot)."""
    if k <= 0:
        return [], None
    if cfg.method == "ngram":
        return ngram_propose(context, k, cfg.prompt_lookup_max, cfg.prompt_lookup_min), None
    assert draft is not None
    # the draft's cache holds a prefix of the context: feed what it has not seen, then draft one token at a time
    feed = context[draft.pos:]
    drafts, qs = [], []
    for _ in range(k):
        q = dist(draft.forward(ids(feed))[0].float())
        d = int(q.argmax()) if greedy else int(torch.multinomial(q, 1, generator=gen))
        drafts.append(d)
        qs.append(q)
        feed = [d]
    return drafts, None if greedy else torch.stack(qs)
