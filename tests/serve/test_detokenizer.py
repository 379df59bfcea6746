"""Streaming text is exact: the deltas concatenate to the non-streamed text, split characters included."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from labkit.serve.detokenizer import IncrementalDetokenizer, TextStream

TEXTS = ["Café crème, naïve façade — déjà vu.", "Emoji: 🚀🔥👩‍💻 and 🇫🇷 flags", "日本語のテキストと中文",
         "mixed ß ∑ 😀 end"]


def stream(tokenizer, ids, stop=None):
    ts = TextStream(tokenizer, stop)
    parts = [ts.push(t) for t in ids] + [ts.finish()]
    return parts, ts


def test_multibyte_characters_are_not_dropped(tokenizer):
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        parts, _ = stream(tokenizer, ids)
        assert "".join(parts) == text == tokenizer.decode(ids, clean_up_tokenization_spaces=False)
        assert all("\ufffd" not in p for p in parts)  # a half character is held back, never sent


def test_an_emoji_split_across_tokens_is_held_back(tokenizer):
    ids = tokenizer("🚀", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1  # byte-level BPE splits this emoji's four bytes
    d = IncrementalDetokenizer(tokenizer)
    assert [d.push(t) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert d.push(ids[-1]) == "🚀"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 49151), min_size=1, max_size=40))
def test_any_token_sequence_streams_to_the_full_decode(tokenizer, ids):
    parts, _ = stream(tokenizer, ids)
    assert "".join(parts) == tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_stop_strings_cut_the_text_and_are_held_back_until_decided(tokenizer):
    text = "one two three four five"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    parts, ts = stream(tokenizer, ids, stop=["three"])
    assert "".join(parts) == "one two " and ts.stopped
    parts, ts = stream(tokenizer, ids, stop=["nowhere"])
    assert "".join(parts) == text and not ts.stopped


@pytest.mark.parametrize("stop", [["four", "two t", "o"], ["o", "two t", "four"], ["ree f", "e fo", "thr"]])
def test_the_earliest_stop_in_the_text_wins_whatever_the_list_order(tokenizer, stop):
    text = "one two three four five"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    parts, ts = stream(tokenizer, ids, stop=stop)
    first = min(text.find(s) for s in stop)
    assert "".join(parts) == text[:first] and ts.stopped


@pytest.fixture(scope="module")
def sentencepiece_tokenizer():
    """A small SentencePiece-BPE tokenizer (Metaspace pre-tokenizer and decoder, as Llama 2 and Mistral use), trained
    here on the kit's own text: its pieces carry their leading space as "▁" and a lone piece decodes without it."""
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from labkit import data

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(data.text("calibration").splitlines()[:3000], vocab_size=600, min_frequency=2,
                           show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=sp)


def test_sentencepiece_spaces_survive_streaming(sentencepiece_tokenizer):
    tok = sentencepiece_tokenizer
    text = "The interpreter reads the whole program before it runs"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert (
        tok.decode(ids[1:2]) != tok.decode(ids[:2])[len(tok.decode(ids[:1])) :]
    )  # the trap: a lone piece loses its space
    parts, _ = stream(tok, ids)
    assert "".join(parts) == text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 599), min_size=1, max_size=40))
def test_any_sentencepiece_sequence_streams_to_the_full_decode(sentencepiece_tokenizer, ids):
    parts, _ = stream(sentencepiece_tokenizer, ids)
    assert "".join(parts) == sentencepiece_tokenizer.decode(ids, skip_special_tokens=True,
                                                            clean_up_tokenization_spaces=False)
