"""Speculators propose K tokens per running sequence, and the distribution q they drew them from.

Rows follow the engine's running batch: `prefill` appends rows, `retire` keeps some, `commit`
tells each row how many of its proposed tokens the target accepted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saguaro.engine.sequence import Sequence
from saguaro.models.transformer import CausalLM
from saguaro.sampling import SamplingParams, sample, target_probs


@dataclass
class Proposal:
    tokens: torch.Tensor  # [B, K]
    q: torch.Tensor | None  # [B, K, V] over the target's vocabulary; None = deterministic (one-hot)


def head_to_vocab(q: torch.Tensor, head_ids: torch.Tensor | None, vocab: int) -> torch.Tensor:
    """q over a draft head [..., V_head] -> over the target's vocabulary [..., vocab], zero off the head.
    head_ids[j] is the target id of head row j; None means the head covers the first V_head ids."""
    if head_ids is None and q.shape[-1] == vocab:
        return q
    full = q.new_zeros(*q.shape[:-1], vocab)
    if head_ids is None:
        full[..., : q.shape[-1]] = q
        return full
    return full.index_copy_(-1, head_ids.to(q.device), q)


class Speculator:
    def prefill(self, seqs: list[Sequence], ids: torch.Tensor, lengths: torch.Tensor) -> None:
        """New sequences (prompts in `ids`, right-padded) join the batch as rows at the end."""

    def propose(self, seqs: list[Sequence], k: int) -> Proposal:
        raise NotImplementedError

    def commit(self, accepted: list[int]) -> None:
        """Row i's first accepted[i] proposed tokens were kept (then the target emitted one of its own)."""

    def retire(self, keep: list[int]) -> None:
        """Only rows `keep` remain, in this order."""


class NgramSpeculator(Speculator):
    """Prompt lookup: continue the latest earlier occurrence of the sequence's last n tokens.

    Deterministic, so q is one-hot on each proposal; any proposal is exact to verify, a good one is
    just accepted more often. Without a match it proposes repeats of the last token.
    """

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def lookup(self, ids: list[int], k: int) -> list[int]:
        return self.match(ids, k)[0]

    def match(self, ids: list[int], k: int) -> tuple[list[int], int]:
        """The proposal and the length of the suffix it continues (0: no match, repeats of the last token)."""
        for n in range(min(self.max_ngram, len(ids) - 1), self.min_ngram - 1, -1):
            suffix = ids[-n:]
            for start in range(len(ids) - n - 1, -1, -1):  # latest occurrence first
                if ids[start : start + n] == suffix:
                    follow = ids[start + n : start + n + k]
                    return follow + [follow[-1]] * (k - len(follow)), n
        return [ids[-1]] * k, 0

    def propose(self, seqs: list[Sequence], k: int) -> Proposal:
        return Proposal(torch.tensor([self.lookup(s.all_ids, k) for s in seqs]), None)


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

    def propose(self, seqs: list[Sequence], k: int) -> Proposal:
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
