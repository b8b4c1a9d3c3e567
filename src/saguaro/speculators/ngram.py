"""Prompt lookup: the model-free speculator."""

from __future__ import annotations

import torch

from saguaro.speculators.base import Proposal, Row, Speculator, repeat_last


class NgramSpeculator(Speculator):
    """Prompt lookup: continue the latest earlier occurrence of the sequence's last n tokens.

    Deterministic, so q is one-hot on each proposal; any proposal is exact to verify, a good one is
    just accepted more often. Without a match it proposes repeats of the last token.
    """

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def lookup(self, ids: list[int], k: int) -> list[int]:
        return self.match(ids, k)[0]

    def find(self, ids: list[int], max_ngram: int | None = None, min_ngram: int | None = None) -> tuple[int, int]:
        """(start, n): the latest earlier occurrence ids[start:start + n] of the last n tokens, for the
        longest n from max_ngram down to min_ngram (defaults: the speculator's); (-1, 0) where none occurs."""
        last = ids[-1]
        for n in range(min(max_ngram or self.max_ngram, len(ids) - 1), (min_ngram or self.min_ngram) - 1, -1):
            suffix = ids[-n:]
            for end in range(len(ids) - 2, n - 2, -1):  # latest occurrence first; its last token checked first
                if ids[end] == last and ids[end - n + 1 : end + 1] == suffix:
                    return end - n + 1, n
        return -1, 0

    def match(self, ids: list[int], k: int, max_ngram: int | None = None) -> tuple[list[int], int]:
        """The proposal and the length of the suffix it continues (0: no match, repeats of the last token).
        max_ngram overrides the longest suffix tried (a caller that requires a longer match needs it)."""
        start, n = self.find(ids, max_ngram)
        if n == 0:
            return [ids[-1]] * k, 0
        return repeat_last(ids[start + n : start + n + k], k), n

    def continuation(self, ids: list[int], k: int, min_match: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the last n >= min_match tokens
        (the longest such n up to max(max_ngram, min_match): the default search stops at max_ngram, so a
        longer required match would never be found), unpadded; [] where there is none."""
        start, n = self.find(ids, max(self.max_ngram, min_match), min_match)
        return ids[start + n : start + n + k] if n >= min_match else []

    def propose(self, seqs: list[Row], k: int) -> Proposal:
        return Proposal(torch.tensor([self.lookup(s.all_ids, k) for s in seqs]), None)
