"""Token ids → text deltas for streaming, exact at every step.

A byte-level tokenizer may split one character (an emoji, an accented letter) across tokens; decoding
the tokens so far then ends in U+FFFD, the replacement character. :class:`IncrementalDetokenizer` holds
such an incomplete tail back until the next token completes it, so the concatenated deltas equal
``tokenizer.decode(all_ids)``. Only the tokens since the last clean boundary are decoded each step.

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
        self.offset = 0  # ids before this index are already sent as text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one token; return the new text that is complete (may be empty)."""
        self.ids.append(token_id)
        text = self._decode(self.ids[self.offset:])
        if text.endswith(REPLACEMENT):
            return ""  # an incomplete character: wait for the bytes that finish it
        self.offset = len(self.ids)
        return text

    def flush(self) -> str:
        """The held-back tail at the end of the stream (decoded as is, replacement characters included)."""
        text = self._decode(self.ids[self.offset:])
        self.offset = len(self.ids)
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
        for s in self.stop:
            i = self.pending.find(s)
            if i >= 0:
                self.stopped = True
                out, self.pending = self.pending[:i], ""
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
