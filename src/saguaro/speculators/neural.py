"""A neural draft model as a speculator."""

from __future__ import annotations

import torch

from saguaro.models.transformer import CausalLM
from saguaro.sampling import sample, target_probs
from saguaro.speculators.base import Proposal, Row, Speculator, head_to_vocab


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

    def prefill(self, seqs, ids, lengths) -> None:
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
        # token when every proposal was accepted (1 or 2 tokens; right-padded to a common width).
        pending = [s.all_ids[n:] for s, n in zip(seqs, self.cache.lengths.tolist())]
        ids = torch.zeros(len(seqs), max(len(p) for p in pending), dtype=torch.long)
        for i, p in enumerate(pending):
            ids[i, : len(p)] = torch.tensor(p)
        counts = torch.tensor([len(p) for p in pending], device=self.cache.lengths.device)
        logits = self.draft(ids.to(self.draft.device), self.cache, logits_at=(counts - 1)[:, None])[:, 0]
        self.cache.lengths += counts
        tokens, qs = [], []
        generators = [s.generator for s in seqs]
        greedy = all(s.params.greedy for s in seqs)
        for step in range(k):
            if greedy:
                tokens.append(self.greedy_tokens(logits))
            else:
                q = target_probs(logits, [s.params for s in seqs])  # over the head; expanded below
                tokens.append(self.head_to_target(sample(q, generators)))
                qs.append(q)
            if step < k - 1:
                logits = self.draft(tokens[-1][:, None], self.cache)[:, -1]
                self.cache.lengths += 1
        self._k = k
        return Proposal(torch.stack(tokens, 1), self.to_target_vocab(torch.stack(qs, 1)) if qs else None)

    def commit(self, accepted: list[int]) -> None:
        extra = torch.tensor([min(a, self._k - 1) for a in accepted], device=self.cache.lengths.device)
        self.cache.lengths += extra - (self._k - 1)

    def retire(self, keep: list[int]) -> None:
        if self.cache is not None:  # None until the first prefill
            self.cache.select_rows(keep)
