"""A neural draft model as a speculator."""

from __future__ import annotations

from collections.abc import Callable

import torch

from saguaro.models.transformer import CausalLM
from saguaro.sampling import draft_probs, sample
from saguaro.speculators.base import Proposal, Row, Speculator, head_to_vocab, right_pad

Draw = Callable[[torch.Tensor, int], tuple[torch.Tensor, "torch.Tensor | None"]]


def draft_k(draft: CausalLM, cache, pending: list[list[int]], k: int, draw: Draw
            ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Feed each row the tokens its cache lacks (`pending`), then draft k tokens, one forward per
    step; draw(logits, step) picks the step's tokens (target ids) and the q they came from (None:
    deterministic). The cache then holds the pending tokens and proposals 1..k-1.
    Returns the tokens [B, k] and the k q's."""
    ids, counts = right_pad(pending)
    counts = counts.to(cache.lengths.device)
    logits = draft(ids.to(draft.device), cache, logits_at=(counts - 1)[:, None])[:, 0]
    cache.lengths += counts
    tokens, qs = [], []
    for step in range(k):
        token, q = draw(logits, step)
        tokens.append(token)
        qs.append(q)
        if step < k - 1:
            logits = draft(token[:, None], cache)[:, -1]
            cache.lengths += 1
    return torch.stack(tokens, 1), qs


class NeuralSpeculator(Speculator):
    """A small draft model with its own KV cache, drafting K tokens autoregressively.

    The draft cache's `lengths` count the sequence tokens it holds; after a round it also holds
    proposals 1..K-1, of which `commit` keeps the accepted ones.
    """

    def __init__(self, draft: CausalLM, target_vocab: int):
        self.draft = draft
        self.target_vocab = target_vocab
        self.cache = None
        self._k = 0

    def prefill(self, seqs, ids, lengths, states=None) -> None:
        cache = self.draft.new_cache(len(lengths), int(lengths.max()) + 64)
        self.draft(ids.to(self.draft.device), cache, logits_at=(lengths - 1)[:, None])
        cache.lengths[:] = lengths
        if self.cache is None:
            self.cache = cache
        else:
            self.cache.extend(cache)

    def head_to_target(self, head_token: torch.Tensor) -> torch.Tensor:
        """Draft-head indices -> target token ids."""
        out_ids = self.draft.output_token_ids
        return head_token if out_ids is None else out_ids[head_token]

    def greedy_tokens(self, logits: torch.Tensor) -> torch.Tensor:
        """The draft's argmax as target token ids, without building q over the whole vocabulary."""
        return self.head_to_target(logits.argmax(-1))

    def to_target_vocab(self, q: torch.Tensor) -> torch.Tensor:
        """q over the draft head [..., V_draft] -> over the target's vocabulary, zero off the head.

        Temperature, top-k, top-p and sigma_{F,C} give the same distribution whether applied over the
        head or over the full vocabulary with -inf logits off the head, so drafters can work in the
        (smaller) head and expand only what the verifier needs."""
        return head_to_vocab(q, self.draft.output_token_ids, self.target_vocab)

    def propose(self, seqs: list[Row], k: int) -> Proposal:
        # Feed what the draft has not seen: the target's last token, plus the last accepted draft
        # token when every proposal was accepted (1 or 2 tokens).
        pending = [s.all_ids[n:] for s, n in zip(seqs, self.cache.lengths.tolist())]
        generators = [s.generator for s in seqs]
        greedy = all(s.params.greedy for s in seqs)

        def draw(logits: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
            if greedy:
                return self.greedy_tokens(logits), None
            q = draft_probs(logits, [s.params for s in seqs])  # over the head; expanded below
            return self.head_to_target(sample(q, generators)), q

        tokens, qs = draft_k(self.draft, self.cache, pending, k, draw)
        self._k = k
        return Proposal(tokens, None if greedy else self.to_target_vocab(torch.stack(qs, 1)))

    def commit(self, accepted: list[int], states=None) -> None:
        extra = torch.tensor([min(a, self._k - 1) for a in accepted], device=self.cache.lengths.device)
        self.cache.lengths += extra - (self._k - 1)

    def retire(self, keep: list[int]) -> None:
        if self.cache is not None:  # None until the first prefill
            self.cache.select_rows(keep)
