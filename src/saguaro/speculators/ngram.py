"""Prompt lookup: the model-free speculator."""

from __future__ import annotations

import torch

from saguaro.speculators.base import Proposal, Row, Speculator


class NgramSpeculator(Speculator):
    """Prompt lookup: continue the latest earlier occurrence of the sequence's last n tokens.

    Deterministic, so q is one-hot on each proposal; any proposal is exact to verify, a good one is
    just accepted more often. Without a match it proposes repeats of the last token.
    """

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def lookup(self, ids: list[int], k: int) -> list[int]:
        return self.match(ids, k)[0]

    def match(self, ids: list[int], k: int, max_ngram: int | None = None) -> tuple[list[int], int]:
        """The proposal and the length of the suffix it continues (0: no match, repeats of the last token).
        max_ngram overrides the longest suffix tried (a caller that requires a longer match needs it)."""
        for n in range(min(max_ngram or self.max_ngram, len(ids) - 1), self.min_ngram - 1, -1):
            suffix = ids[-n:]
            for start in range(len(ids) - n - 1, -1, -1):  # latest occurrence first
                if ids[start : start + n] == suffix:
                    follow = ids[start + n : start + n + k]
                    return follow + [follow[-1]] * (k - len(follow)), n
        return [ids[-1]] * k, 0

    def propose(self, seqs: list[Row], k: int) -> Proposal:
        return Proposal(torch.tensor([self.lookup(s.all_ids, k) for s in seqs]), None)
