"""Streaming text is exact: the deltas concatenate to the non-streamed text, split characters included."""

from hypothesis import given, settings
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
