"""Quality measures: perplexity on fixed held-out windows, accuracy, agreement with a reference.

Perplexity is always scored on held-out human text (``labkit.data``), never on a model's own output.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from labkit import LabkitError, data
from labkit.measure import model_device


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer: Any, text: str | None = None, *, window: int = 256,
               stride: int | None = None, max_windows: int | None = None, progress: bool = False) -> float:
    """exp(mean negative log-likelihood) of ``text`` (default: the evaluation split) under ``model``.

    The text is cut into windows of ``window`` tokens every ``stride`` tokens; each token is scored once.
    Log-likelihoods are summed in float64 so the result is reproducible bit for bit on one machine.
    """
    if text is None:
        wins = data.token_windows(tokenizer, "evaluation", window=window, stride=stride, max_windows=max_windows)
    else:
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) < 2:
            raise LabkitError(f"text has {len(ids)} tokens; perplexity needs at least 2")
        wins = data.windows(ids, window=window, stride=stride, max_windows=max_windows)
    return perplexity_of_windows(model, wins, progress=progress)


def eval_set_note(tokenizer: Any = None, *, window: int = 256, stride: int | None = None,
                  max_windows: int | None = None) -> str:
    """Which held-out text a perplexity scored ("8 windows x 256 tokens, 2,040 tokens scored"): perplexities are
    comparable only on the same windows, so every notebook prints this beside its dense number. The default
    tokenizer is SmolLM2's (shipped with the kit)."""
    if tokenizer is None:
        from transformers import AutoTokenizer

        from labkit.zoo import _tokenizer_dir

        tokenizer = AutoTokenizer.from_pretrained(_tokenizer_dir())
    wins = data.token_windows(tokenizer, "evaluation", window=window, stride=stride, max_windows=max_windows)
    scored = sum(n for _, n in wins)
    return f"{len(wins)} held-out windows x {window} tokens, {scored:,} tokens scored"


@torch.no_grad()
def perplexity_of_windows(model: nn.Module, wins: list[tuple[torch.Tensor, int]], progress: bool = False) -> float:
    dev = model_device(model)
    total_nll = 0.0
    total_tokens = 0
    for ids, n_scored in tqdm(wins, desc="perplexity", disable=not progress):
        ids = ids.to(dev)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        targets = ids[0, 1:]
        nll = F.cross_entropy(logits[-n_scored:], targets[-n_scored:], reduction="sum")
        total_nll += float(nll.double())
        total_tokens += n_scored
    return math.exp(total_nll / total_tokens)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose arg-max equals the label."""
    if logits.shape[0] != labels.shape[0]:
        raise LabkitError(f"logits has {logits.shape[0]} rows but labels has {labels.shape[0]}")
    return float((logits.argmax(-1) == labels).float().mean())


@torch.no_grad()
def classifier_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``, in batches, on the model's device (labels may be anywhere)."""
    dev = model_device(model)
    preds = torch.cat([model(x[i:i + batch].to(dev)).argmax(-1).cpu() for i in range(0, len(x), batch)])
    return float((preds == y.cpu()).float().mean())


def top1_agreement(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Fraction of positions where two models pick the same top-1 token/class."""
    return float((logits.argmax(-1) == reference.argmax(-1)).float().mean())


def kl_divergence(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean KL(reference || model) over positions, in nats."""
    ref_logp = F.log_softmax(reference.float(), -1).flatten(0, -2)
    logp = F.log_softmax(logits.float(), -1).flatten(0, -2)
    return float(F.kl_div(logp, ref_logp, log_target=True, reduction="batchmean"))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity between matching rows of ``a`` and ``b``."""
    if a.shape != b.shape:
        raise LabkitError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float(F.cosine_similarity(a.float(), b.float(), dim=-1).mean())


@torch.no_grad()
def encode_sentences(tokenizer: Any, sentences: list[str], device: torch.device | str = "cpu") -> dict:
    """Tokenised, padded batch for :func:`embed` (done once, outside any timed region)."""
    return tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt").to(device)


@torch.no_grad()
def embed(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean-pooled, L2-normalised embeddings of an already tokenised batch: the model's work alone."""
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return F.normalize(pooled.float(), dim=-1).cpu()


def sentence_embeddings(model: nn.Module, tokenizer: Any, sentences: list[str]) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (sentence-transformers' recipe for MiniLM)."""
    return embed(model, encode_sentences(tokenizer, sentences, model_device(model)))


def token_agreement(outputs: list[list[int]], reference: list[list[int]]) -> float:
    """The share of the reference's tokens each output reproduces before its first difference: 1.0 is
    token-identical; after a difference greedy decoding follows another text, so later matches are not counted."""
    agreed = 0
    for out, ref in zip(outputs, reference):
        for a, b in zip(out, ref):
            if a != b:
                break
            agreed += 1
    return agreed / max(1, sum(len(r) for r in reference))
