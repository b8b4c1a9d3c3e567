"""A feature-conditioned draft (models/feature_draft.py) as a speculator: it reads the target's states.

The engine hands over the target's final-norm hidden states wherever the target ran: the prompt's at
prefill, and at every verification the states of the positions it verified. The draft's cache only ever
keeps tokens fed with the target's states; a round's drafted tokens (fed with the draft's own guesses)
are dropped at `commit`, and the accepted ones come back as pending tokens with the target's states,
as EAGLE does.

Per row: `fed` tokens are in the draft's cache; the tokens after them are pending, and `known[j]` is the
target's state at position fed - 1 + j, the feature the pending token j is fed with.
"""

from __future__ import annotations

import torch

from saguaro.models.feature_draft import FeatureDraft
from saguaro.sampling import draft_probs, sample
from saguaro.speculators.base import Proposal, Row, right_pad
from saguaro.speculators.neural import NeuralSpeculator


class FeatureSpeculator(NeuralSpeculator):
    needs_target_states = True

    def __init__(self, draft: FeatureDraft, target_vocab: int):
        super().__init__(draft, target_vocab)
        self.known: list[torch.Tensor] = []  # per row: [pending, H] target states

    def prefill(self, seqs, ids, lengths, states=None) -> None:
        """Feed each prompt but its last state's successor: token j with the target's state at j-1."""
        if states is None:
            raise ValueError("a feature draft needs the target's hidden states at prefill")
        feats = torch.cat([torch.zeros_like(states[:, :1]), states[:, :-1]], 1)
        cache = self.draft.new_cache(len(lengths), int(lengths.max()) + 64)
        self.draft.draft_step(ids.to(self.draft.device), feats.to(self.draft.device), cache,
                              logits_at=(lengths - 1)[:, None])
        cache.lengths[:] = lengths
        last = [states[i, int(n) - 1 : int(n)] for i, n in enumerate(lengths)]  # for the first sampled token
        if self.cache is None:
            self.cache, self.known = cache, last
        else:
            self.cache.extend(cache)
            self.known += last

    def propose(self, seqs: list[Row], k: int) -> Proposal:
        fed = self.cache.lengths.tolist()
        pending = [s.all_ids[n:] for s, n in zip(seqs, fed)]
        if any(len(p) != len(f) for p, f in zip(pending, self.known)):
            raise RuntimeError("feature draft out of step with the engine: a pending token has no target state")
        ids, counts = right_pad(pending)
        feats = torch.zeros(len(seqs), ids.shape[1], self.known[0].shape[-1], dtype=self.draft.dtype)
        for i, f in enumerate(self.known):
            feats[i, : len(f)] = f
        greedy = all(s.params.greedy for s in seqs)
        generators = [s.generator for s in seqs]
        cache, dev = self.cache, self.draft.device
        logits, guess = self.draft.draft_step(ids.to(dev), feats.to(dev), cache,
                                              logits_at=(counts - 1)[:, None].to(dev))
        cache.lengths += counts.to(cache.lengths.device)
        self._fed = [n + len(p) for n, p in zip(fed, pending)]
        tokens, qs = [], []
        for step in range(k):
            step_logits = logits[:, -1]
            if greedy:
                token, q = self.greedy_tokens(step_logits), None
            else:
                q = draft_probs(step_logits, [s.params for s in seqs])
                token = self.head_to_target(sample(q, generators))
            tokens.append(token)
            qs.append(q)
            if step < k - 1:
                logits, guess = self.draft.draft_step(token[:, None].to(dev), guess, cache)
                cache.lengths += 1
        self._k = k
        tokens_t = torch.stack(tokens, 1)
        return Proposal(tokens_t, None if greedy else self.to_target_vocab(torch.stack(qs, 1)))

    def commit(self, accepted: list[int], states=None) -> None:
        """Drop the drafted tokens; the accepted ones and the target's token are pending, with the states
        the verification computed (states[i, j]: the target's state at the round's j-th position)."""
        if states is None:
            raise ValueError("a feature draft needs the target's hidden states of each verification")
        self.cache.lengths[:] = torch.tensor(self._fed, device=self.cache.lengths.device)
        self.known = [states[i, : a + 1] for i, a in enumerate(accepted)]

    def decoded_plainly(self, states=None) -> None:
        """Each row's new token is pending too, fed with the state the target computed for the token before."""
        if states is None:
            raise ValueError("a feature draft needs the target's hidden states of each plain step")
        self.known = [torch.cat([f, states[i, -1:].to(f.dtype)]) for i, f in enumerate(self.known)]

    def retire(self, keep: list[int]) -> None:
        if self.cache is not None:
            self.cache.select_rows(keep)
            self.known = [self.known[i] for i in keep]
