"""Text deltas for a growing list of output tokens, for streaming.

A token can hold part of a character (byte-level BPE splits multi-byte UTF-8 over tokens), so
decoding token by token is wrong. We decode the whole output each time and emit what is new,
holding back a trailing U+FFFD (a character whose other bytes have not arrived yet) and any tail
that could still become a stop string. The concatenated deltas then equal the text
`LLM.generate` returns for the same tokens, stop strings included.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.sent = ""  # text emitted so far
        self.stopped = False  # a stop string appeared: the text ends before it, nothing more comes

    def update(self, token_ids: list[int], final: bool = False) -> str:
        """The text new since the last call; `final` when no more tokens will come."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(token_ids)
        cut = self._first_stop(text)
        if cut is not None:
            text, self.stopped, final = text[:cut], True, True
        if not final:
            text = text.rstrip(REPLACEMENT)
            text = text[: len(text) - self._stop_prefix(text)]
        if not text.startswith(self.sent):
            # The decoded prefix changed under us (a tokenizer that is not prefix-stable): what was
            # sent cannot be taken back, so send only what extends it, or wait.
            log.debug("decoded text no longer extends the streamed text")
            return text[len(self.sent):] if final and len(text) > len(self.sent) else ""
        delta = text[len(self.sent):]
        self.sent = text
        return delta

    def _first_stop(self, text: str) -> int | None:
        """Where the earliest stop string starts (none can start inside what was already sent)."""
        hits = [i for i in (text.find(s, len(self.sent)) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest tail of `text` that is the start of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
