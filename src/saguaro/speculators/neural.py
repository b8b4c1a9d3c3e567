"""A neural draft model as a speculator."""

from __future__ import annotations

from collections.abc import Callable

import torch

from saguaro.models.transformer import CausalLM
from saguaro.sampling import draft_probs, sample
from saguaro.speculators.base import Proposal, Row, Speculator, head_to_vocab, repeat_last, right_pad
from saguaro.speculators.ngram import NgramSpeculator

Draw = Callable[[torch.Tensor, int], tuple[torch.Tensor, "torch.Tensor | None"]]


Continues = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def draft_k(draft: CausalLM, cache, pending: list[list[int]], k: int, draw: Draw, continues: Continues | None = None,
            read_chunk: int = 0) -> tuple[torch.Tensor, list[torch.Tensor | None], torch.Tensor | None]:
    """Feed each row the tokens its cache lacks (`pending`), then draft up to k tokens, one forward per
    step; draw(logits, step) picks the step's tokens (target ids) and the q they came from (None:
    deterministic). continues(logits, q) -> [B] bool: whether a row drafts past the token just drawn
    (None: always); drafting ends once no row continues. read_chunk: the most tokens one compiled
    draft step reads (`read_ahead`; 0: none).
    Returns the tokens [B, n] (n <= k steps run), the n q's, and each row's proposed count [B] (None
    without `continues`: all n). The cache then holds the pending tokens and proposals 1..n-1."""
    if len(pending) == 1 and read_chunk > 1:
        pending = [read_ahead(draft, cache, pending[0], read_chunk)]
    ids, counts = right_pad(pending)
    counts = counts.to(cache.lengths.device)
    logits = draft(ids.to(draft.device), cache, logits_at=(counts - 1)[:, None])[:, 0]
    cache.lengths += counts
    tokens, qs = [], []
    live = lengths = None  # rows still drafting; each row's count so far
    if continues is not None:
        live = torch.ones(len(pending), dtype=torch.bool)
        lengths = torch.zeros(len(pending), dtype=torch.long)
    for step in range(k):
        token, q = draw(logits, step)
        tokens.append(token)
        qs.append(q)
        if continues is not None:
            lengths += live
            live &= continues(logits, q).cpu()
            if not bool(live.any()):
                break
        if step < k - 1:
            logits = draft(token[:, None], cache)[:, -1]
            cache.lengths += 1
    return torch.stack(tokens, 1), qs, lengths


READ_AHEAD_CHUNKS = 3  # at most this many compiled calls before eager is the cheaper way


def compiled_reads(draft: CausalLM, most: int = 8) -> int:
    """The most tokens (up to `most`) one compiled step of `draft` reads for one row; 0 without any."""
    step = getattr(draft, "compiled", None)
    return next((t for t in range(most, 0, -1) if step is not None and step.accepts(1, t)), 0)


def read_ahead(draft: CausalLM, cache, tokens: list[int], chunk: int) -> list[int]:
    """One row's pending tokens: while more are left than a compiled step reads (`chunk`: after prompt
    lookup's rounds, which the draft skips), read the leading ones `chunk` at a time, and return the
    rest for the call that drafts (which then fits a compiled step too). The eager forward costs ~4x a
    compiled step on the embedded draft (~1 ms to read 3-5 tokens, against ~0.25); a prompt, longer,
    stays one eager forward. The draft's kernels give each token the same K/V and logits however the
    tokens are split (docs/exactness.md)."""
    if len(tokens) <= chunk or len(tokens) > READ_AHEAD_CHUNKS * chunk:
        return tokens
    while len(tokens) > chunk:
        ids = torch.tensor([tokens[:chunk]], device=draft.device)
        draft(ids, cache, logits_at=torch.full((1, 1), chunk - 1, device=cache.lengths.device))
        cache.lengths += chunk
        tokens = tokens[chunk:]
    return tokens


class NeuralSpeculator(Speculator):
    """A small draft model with its own KV cache, drafting up to K tokens autoregressively.

    min_confidence: a row stops drafting after a token where the draft's top probability was below
    this (its q when sampling, the softmax of its logits when greedy), so a weak draft proposes long
    runs only where it is sure; 0 always drafts K. The rule reads only what the draft knew before
    drawing the token, which keeps verification exact (engine/verify.py).

    lookup_min_match: in a greedy batch where every row's last n >= this many tokens occurred before,
    the rows propose what followed that occurrence (prompt lookup, as SSD does ahead of its cache) and
    the draft does not run; 0 never. Greedy verification keeps any proposal exact.

    The draft cache's `lengths` count the sequence tokens it holds; after a round of n drafting steps
    it also holds proposals 1..n-1, of which `commit` keeps the accepted ones.
    """

    def __init__(self, draft: CausalLM, target_vocab: int, min_confidence: float = 0.0, lookup_min_match: int = 0):
        if not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence}")
        if lookup_min_match < 0:
            raise ValueError(f"lookup_min_match must be >= 0, got {lookup_min_match}")
        self.draft = draft
        self.target_vocab = target_vocab
        self.min_confidence = min_confidence
        self.lookup_min_match = lookup_min_match
        self._lookup = NgramSpeculator()
        self.cache = None
        self._k = 0  # drafting steps of the last round (0: it was prompt lookup's)

    def prefill(self, seqs, ids, lengths, states=None) -> None:
        """New rows join with an empty draft cache: the draft reads a row's prompt in the first round that
        speculates for it (`propose` feeds each row what its cache lacks), so rows that only ever decode
        plainly (batches under mode auto) cost the draft nothing."""
        self._join(self.draft.new_cache(len(lengths), int(lengths.max()) + 64))

    def read_prompts(self, ids: torch.Tensor, lengths: torch.Tensor) -> None:
        """`prefill` with the draft reading the prompts now (SSD's drafter: its trees branch off their KV)."""
        cache = self.draft.new_cache(len(lengths), int(lengths.max()) + 64)
        self.draft(ids.to(self.draft.device), cache, logits_at=(lengths - 1)[:, None])
        cache.lengths[:] = lengths
        self._join(cache)

    def _join(self, cache) -> None:
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

    def looked_up(self, seqs: list[Row], k: int) -> Proposal | None:
        """Prompt lookup's proposal where the whole batch is greedy and every row has a match; else None."""
        if not self.lookup_min_match or not all(s.params.greedy for s in seqs):
            return None
        rows = []
        for s in seqs:
            follow = self._lookup.continuation(s.all_ids, k, self.lookup_min_match)
            if not follow:
                return None
            rows.append(follow)
        width = max(len(r) for r in rows)
        tokens = torch.tensor([repeat_last(r, width) for r in rows])
        return Proposal(tokens, None, torch.tensor([len(r) for r in rows]), from_lookup=True)

    def propose(self, seqs: list[Row], k: int) -> Proposal:
        proposal = self.looked_up(seqs, k)
        if proposal is not None:  # the draft reads these tokens in its next round (`pending`)
            self._k = 0
            return proposal
        # Feed what the draft has not seen: the target's last token, plus the last accepted draft
        # token when every proposal was accepted (1 or 2 tokens; a row's whole prompt in its first round).
        pending = [s.all_ids[n:] for s, n in zip(seqs, self.cache.lengths.tolist())]
        generators = [s.generator for s in seqs]
        greedy = all(s.params.greedy for s in seqs)

        def draw(logits: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
            if greedy:
                return self.greedy_tokens(logits), None
            q = draft_probs(logits, [s.params for s in seqs])  # over the head; expanded below
            return self.head_to_target(sample(q, generators)), q

        tokens, qs, lengths = draft_k(self.draft, self.cache, pending, k, draw,
                                      self.confident if self.min_confidence > 0 else None, self.read_chunk())
        self._k = tokens.shape[1]
        return Proposal(tokens, None if greedy else self.to_target_vocab(torch.stack(qs, 1)), lengths)

    def read_chunk(self) -> int:
        """The most pending tokens of one row the draft reads per compiled call (`read_ahead`)."""
        return compiled_reads(self.draft)

    def confident(self, logits: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
        """[B] bool: the draft's top probability at the position just drawn is >= min_confidence."""
        if q is None:  # greedy: exp(max - logsumexp), without forming the softmax over the vocabulary
            logits = logits.float()
            return (logits.amax(-1) - logits.logsumexp(-1)).exp() >= self.min_confidence
        return q.amax(-1) >= self.min_confidence

    def commit(self, accepted: list[int], states=None) -> None:
        if self._k == 0:  # prompt lookup's round: the draft's cache is as it was
            return
        extra = torch.tensor([min(a, self._k - 1) for a in accepted], device=self.cache.lengths.device)
        self.cache.lengths += extra - (self._k - 1)

    def retire(self, keep: list[int]) -> None:
        if self.cache is not None:  # None until the first prefill
            self.cache.select_rows(keep)
