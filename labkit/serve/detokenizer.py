"""Token ids → text deltas for streaming, exact at every step.

Two things break naive per-token decoding. A byte-level tokenizer (GPT-2 style, SmolLM2's) may split one character
(an emoji, an accented letter) across tokens; decoding the tokens so far then ends in U+FFFD, the replacement
character. A SentencePiece-style tokenizer (Metaspace: Llama 2, Mistral) drops the leading space of the first piece
it decodes, so ``decode([id of "▁world"])`` is ``"world"``, not ``" world"``. :class:`IncrementalDetokenizer` handles
both as vLLM's incremental detokenizer does: it decodes the new tokens *together with the few before them* (the
prefix window) and sends only the text beyond the prefix's own decoding, and it holds an incomplete character back
until the next token completes it. So the concatenated deltas equal ``tokenizer.decode(all_ids)``; both kinds are
tested (``tests/serve/test_detokenizer.py`` trains a small SentencePiece-BPE tokenizer for the second).

:class:`TextStream` adds OpenAI-style ``stop`` strings on top: text up to the first stop string is sent,
and while text *might* be the start of a stop string it is held back too.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:offset] are sent already and decoded again as context for the next ones
        self.offset = 0  # ids before this index are already sent as text
        self.before = ""  # the decoding of ids[prefix:offset], kept until the window moves

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def _delta(self) -> str:
        """The text of ids[offset:], decoded in the context of the window before it."""
        return self._decode(self.ids[self.prefix:])[len(self.before):]

    def push(self, token_id: int) -> str:
        """Add one token; return the new text that is complete (may be empty)."""
        self.ids.append(token_id)
        text = self._delta()
        if not text or text.endswith(REPLACEMENT):
            return ""  # an incomplete character (or a token with no text yet): wait for the next token
        self.prefix, self.offset = self.offset, len(self.ids)
        self.before = self._decode(self.ids[self.prefix:self.offset])
        return text

    def flush(self) -> str:
        """The held-back tail at the end of the stream (decoded as is, replacement characters included)."""
        text = self._delta()
        self.prefix = self.offset = len(self.ids)
        self.before = ""
        return text


class TextStream:
    """Deltas of a response's text with ``stop`` strings applied; ``stopped`` once one is found."""

    def __init__(self, tokenizer: Any, stop: list[str] | None = None) -> None:
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stop = [s for s in (stop or []) if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.pending = ""  # decoded, not yet sent
        self.stopped = False

    def _emit(self, final: bool) -> str:
        hits = [i for s in self.stop if (i := self.pending.find(s)) >= 0]
        if hits:  # the earliest match in the text ends it, whatever the stops' order in the list (OpenAI's rule)
            self.stopped = True
            out, self.pending = self.pending[:min(hits)], ""
            return out
        cut = len(self.pending) if final else max(0, len(self.pending) - self.hold)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.pending += self.detok.push(token_id)
        return self._emit(final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        self.pending += self.detok.flush()
        return self._emit(final=True)
