"""Text deltas for a growing list of output tokens, for streaming.

A token can hold part of a character (byte-level BPE splits multi-byte UTF-8 over tokens), so
decoding token by token is wrong. We decode the whole output each time and emit what is new,
holding back a trailing U+FFFD (a character whose other bytes have not arrived yet) and any tail
that could still become a stop string. The concatenated deltas then equal the text
`LLM.generate` returns for the same tokens, stop strings included.

`StopStrings` is the one place stop strings end generation: every face (LLM, CLI, chat, server)
hangs one on its Sequence (`stop_check`), and the engine calls it after each round, so the engine
itself never needs a tokenizer.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"


class StopStrings:
    """Finds the earliest stop string in a sequence's growing output (the engine's `Sequence.stop_check`).

    Called with the whole output after each round (a speculative round may add several tokens), it
    returns None while no stop string has appeared, else how many tokens to keep: the longest prefix
    whose text ends at or before the stop string. `text` is then the output's text up to the stop
    string, as OpenAI returns it. The two agree exactly when the stop string starts on a token
    boundary; when a token straddles it (" (" for the stop string "("), the kept tokens end before
    that token and `text` still holds its characters ahead of the stop string.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        if not self.stop:
            raise ValueError("no stop strings given")
        self.longest = max(map(len, self.stop))
        self.searched = 0  # no stop string ends inside the first `searched` characters of the text
        self.text: str | None = None  # the text before the stop string, once one appeared

    @classmethod
    def for_params(cls, tokenizer, stop: list[str] | None) -> StopStrings | None:
        """A checker for a request's stop strings, or None when it has none (the engine skips it)."""
        return cls(tokenizer, stop) if stop and any(stop) else None

    def __call__(self, token_ids: list[int]) -> int | None:
        if self.text is not None:
            return None
        text = self.tokenizer.decode(token_ids)
        start = max(0, self.searched - self.longest + 1)  # a stop string may span the old end
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        if not hits:
            self.searched = len(text.rstrip(REPLACEMENT))
            return None
        self.text = text[: min(hits)]
        return self._tokens_before(token_ids, self.text)

    def _tokens_before(self, token_ids: list[int], text: str) -> int:
        """The most leading tokens whose text is a prefix of `text` (few decodes: the stop string is
        near the end)."""
        for n in range(len(token_ids) - 1, 0, -1):
            if text.startswith(self.tokenizer.decode(token_ids[:n])):
                return n
        return 0


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        # hand `stops` to the engine as the Sequence's stop_check: the engine then cuts the tokens
        # and this streams the text the checker found
        self.stops = StopStrings.for_params(tokenizer, self.stop)
        self.sent = ""  # text emitted so far
        self.stopped = False  # a stop string appeared: the text ends before it, nothing more comes

    def update(self, token_ids: list[int], final: bool = False) -> str:
        """The text new since the last call; `final` when no more tokens will come."""
        if self.stopped:
            return ""
        if self.stops is not None and self.stops.text is not None:  # the engine ended it at a stop string
            text, self.stopped, final = self.stops.text, True, True
        else:
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

    def covered(self, token_ids: list[int], start: int = 0) -> int:
        """How many leading tokens (at least `start`) have all their text in what was sent."""
        n = start
        while n < len(token_ids) and self.sent.startswith(self.tokenizer.decode(token_ids[: n + 1])):
            n += 1
        return n

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
