import math

import pytest
import torch
from torch import nn

from labkit import LabkitError, evaluate


class Uniform(nn.Module):
    """A 'language model' whose every prediction is uniform: perplexity must equal the vocabulary size."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        return type("Out", (), {"logits": logits})()


class Tok:
    name_or_path = "chars"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 50 for c in text]}

    def __len__(self):
        return 50


def test_perplexity_of_uniform_model_is_vocab_size():
    ppl = evaluate.perplexity(Uniform(50), Tok(), "hello world, " * 20, window=16, stride=8)
    assert math.isclose(ppl, 50.0, rel_tol=1e-6)


def test_perplexity_of_perfect_predictor_is_one():
    class Copy(Uniform):  # predicts the next char of a repeating "ab" string with certainty
        def forward(self, input_ids, use_cache=False):
            nxt = torch.where(input_ids == ord("a") % 50, ord("b") % 50, ord("a") % 50)
            return type("Out", (), {"logits": nn.functional.one_hot(nxt, 50).float() * 1e4})()

    assert evaluate.perplexity(Copy(50), Tok(), "ab" * 40, window=10, stride=5) == pytest.approx(1.0)


def test_perplexity_needs_two_tokens():
    with pytest.raises(LabkitError, match="at least 2"):
        evaluate.perplexity(Uniform(50), Tok(), "a")


def test_perplexity_is_bitwise_reproducible(tiny_lm, tokenizer):
    a = evaluate.perplexity(tiny_lm, tokenizer, window=64, max_windows=3)
    b = evaluate.perplexity(tiny_lm, tokenizer, window=64, max_windows=3)
    assert a == b


def test_agreement_measures():
    ref = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    assert evaluate.top1_agreement(ref, ref) == 1.0
    assert evaluate.top1_agreement(-ref, ref) == 0.0
    assert evaluate.kl_divergence(ref, ref) == pytest.approx(0.0, abs=1e-7)
    assert evaluate.kl_divergence(torch.zeros_like(ref), ref) > 0
    assert evaluate.cosine(ref, 3 * ref) == pytest.approx(1.0)
    assert evaluate.accuracy(ref, torch.tensor([0, 1])) == 1.0
    with pytest.raises(LabkitError, match="rows"):
        evaluate.accuracy(ref, torch.tensor([0]))


def test_sentence_embeddings_paraphrases_closer(minilm):
    from labkit.data import sentences

    model, tok = minilm
    emb = evaluate.sentence_embeddings(model, tok, sentences()[:4])
    assert emb.shape == (4, 384)
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2])


def test_token_agreement_counts_only_up_to_the_first_difference():
    ref = [[1, 2, 3, 4], [5, 6]]
    assert evaluate.token_agreement(ref, ref) == 1.0
    assert evaluate.token_agreement([[1, 2, 9, 4], [5, 6]], ref) == 4 / 6  # the 4 after the difference does not count
    assert evaluate.token_agreement([[0, 2, 3, 4], [5]], ref) == 1 / 6
