"""The SSD draft side: pre-draft the next speculation for many likely verification outcomes.

While the target verifies speculation S = s_1..s_K of a sequence with context x, the drafter
1. feeds x's new tokens and S to its main cache row, reading its own distributions q_1..q_{K+1};
2. picks outcome candidates: for k < K the top-F_k tokens of q_{k+1} other than s_{k+1} (a rejected
   position never emits the draft's own token), for k = K the top-F_K tokens of q_{K+1};
3. drafts K tokens for every branch (k, t), context x + s_1..s_k + t, all branches of all rows in
   one forward per depth. Branch tokens live in cache slots past the main row and see the shared
   prefix through the attention mask;
4. stores (k, t) -> (tokens, q) in the speculation cache.
When the real outcome (k*, t*) arrives, a hit returns the stored speculation at once; a miss
falls back to just-in-time drafting (neural), the n-gram backup, or no drafting at all ("none":
K copies of the last token, verified like any proposal, so the round still yields >= 1 token).

This class knows nothing of processes: the worker runs it remotely, tests run it in place.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from saguaro.models.transformer import CausalLM
from saguaro.sampling import SamplingParams, draft_probs, sample
from saguaro.speculators import NeuralSpeculator, NgramSpeculator, draft_k, repeat_last, right_pad
from saguaro.ssd.online import FALLBACKS
from saguaro.ssd.sampling import saguaro_distribution


def draft_seed(seed: int) -> int:
    """The drafter's own stream for a seeded request, far from any small request seed (an LCG step),
    so one request's draft draws never replay another request's verification draws."""
    return (seed * 6364136223846793005 + 1442695040888963407) % 2**63


@dataclass
class Speculation:
    tokens: list[int]
    q: torch.Tensor | None  # [K, V_draft] over the draft head (target_q expands it); None if deterministic
    hit: bool = False
    source: str = "tree"  # "tree" (cache hit), "lookup" (prompt lookup first), or the fallback:
    # "neural", "ngram" or "none"


@dataclass
class DraftRow:
    """What the drafter knows of one sequence."""

    seq_id: int
    params: SamplingParams
    tokens: list[int]  # committed context (prompt + output so far)
    generator: torch.Generator | None
    speculation: Speculation | None = None  # the one being verified now
    branches: dict[tuple[int, int], Speculation] = field(default_factory=dict)


__all__ = ["FALLBACKS", "DraftRow", "SSDDrafter", "Speculation", "draft_seed"]


class SSDDrafter:
    def __init__(self, draft: CausalLM, target_vocab: int, k: int, fanout: list[int], c: float = 1.0,
                 fallback: str = "neural"):
        if len(fanout) != k + 1:
            raise ValueError(f"fan-out needs K+1 = {k + 1} entries, got {len(fanout)}")
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
        self.draft, self.k, self.fanout, self.c, self.fallback = draft, k, list(fanout), c, fallback
        # a greedy row whose context repeats its last n >= prompt_lookup_min_match tokens takes the
        # prompt-lookup continuation, hit or miss (0: never); the engine sets it with the policy every round
        self.prompt_lookup_min_match = 0
        # the draft as a speculator: its cache holds the main row of each sequence (the tree's branches
        # go in slots past it), and it maps draft-head indices to target ids
        self.neural = NeuralSpeculator(draft, target_vocab)
        self.ngram = NgramSpeculator()
        self.rows: list[DraftRow] = []
        self.tree_s = 0.0  # time spent building the last tree
        self.fallback_s = 0.0  # time spent on misses in the last respond
        out_ids = draft.output_token_ids  # head index of each target token, -1 where the head has none
        self.head_index = None
        if out_ids is not None:
            self.head_index = torch.full((target_vocab,), -1, dtype=torch.long, device=out_ids.device)
            self.head_index[out_ids] = torch.arange(len(out_ids), device=out_ids.device)

    def set_policy(self, fanout: list[int], fallback: str, prompt_lookup_min_match: int = 0) -> None:
        """Fan-out of the next tree, fallback of the next misses and the prompt-lookup rule (the engine's)."""
        if len(fanout) != self.k + 1 or fallback not in FALLBACKS or prompt_lookup_min_match < 0:
            raise ValueError(f"bad policy: fan-out {fanout}, fallback {fallback!r}, "
                             f"prompt lookup {prompt_lookup_min_match}")
        self.fanout, self.fallback = list(fanout), fallback
        self.prompt_lookup_min_match = prompt_lookup_min_match

    # ------------------------------------------------------------------ batch membership
    @torch.inference_mode()
    def prefill(self, seq_ids: list[int], prompts: list[list[int]], params: list[SamplingParams],
                seeds: list[int | None]) -> None:
        ids, lengths = right_pad(prompts)
        self.neural.read_prompts(ids.to(self.draft.device), lengths.to(self.draft.device))
        for sid, p, sp, seed in zip(seq_ids, prompts, params, seeds):
            g = None if seed is None else torch.Generator().manual_seed(draft_seed(seed))
            self.rows.append(DraftRow(sid, sp, list(p), g))

    @torch.inference_mode()
    def retire(self, keep: list[int]) -> None:
        self.neural.retire(keep)
        self.rows = [self.rows[i] for i in keep]

    # ------------------------------------------------------------------ outcomes -> next speculations
    @torch.inference_mode()
    def respond(self, outcomes: list[tuple[int, int] | None], new_tokens: list[list[int]]) -> list[Speculation]:
        """Row i's last speculation ended in outcomes[i] = (k accepted, emitted token) and its context
        grew by new_tokens[i]; return each row's next speculation (a cache hit or a fallback)."""
        out: list[Speculation | None] = []
        miss_rows = []
        for i, (row, outcome, new) in enumerate(zip(self.rows, outcomes, new_tokens)):
            known = len(row.tokens)
            row.tokens += new
            spec = row.branches.get(outcome) if outcome is not None else None
            row.branches = {}
            if outcome is not None:  # keep the main row's KV for x + s_1..s_k only
                self.neural.cache.lengths[i] = len(row.tokens) - 1
            elif int(self.neural.cache.lengths[i]) > known:  # no outcome for the last tree (the engine ran
                self.neural.cache.lengths[i] = known  # other rounds meanwhile): keep the KV of x only
            looked_up = self._prompt_lookup(row, cached=spec is not None)
            if looked_up is not None:
                spec = looked_up
            elif spec is not None:
                spec.hit = True
            else:
                miss_rows.append(i)
            out.append(spec)
        t = time.perf_counter()
        if miss_rows:
            for i, spec in zip(miss_rows, self._fallback(miss_rows)):
                out[i] = spec
        self.fallback_s = time.perf_counter() - t
        for row, spec in zip(self.rows, out):
            row.speculation = spec
        return out

    def _prompt_lookup(self, row: DraftRow, cached: bool) -> Speculation | None:
        """Prompt lookup ahead of the cache, for greedy rows whose context repeats itself: there a
        long n-gram match is accepted more often than the draft's own guess (README, "Prompt lookup
        first"). Sampled rows keep the draft's q, which a deterministic proposal would give up."""
        if not self.prompt_lookup_min_match or not row.params.greedy:
            return None
        follow = self.ngram.continuation(row.tokens, self.k, self.prompt_lookup_min_match)
        if not follow:
            return None
        return Speculation(repeat_last(follow, self.k), None, hit=cached, source="lookup")  # k tokens

    def target_q(self, q: torch.Tensor) -> torch.Tensor:
        """A speculation's q over the draft head -> over the target vocabulary (what the verifier uses)."""
        return self.neural.to_target_vocab(q)

    def _fallback(self, rows: list[int]) -> list[Speculation]:
        if self.fallback == "ngram":
            return [Speculation(self.ngram.lookup(self.rows[i].tokens, self.k), None, source="ngram") for i in rows]
        if self.fallback == "none":
            return [Speculation([self.rows[i].tokens[-1]] * self.k, None, source="none") for i in rows]
        # just-in-time neural drafting for the missed rows; the other rows' cache rows stay as they are
        return self._draft_rows(rows)

    def _draft_rows(self, rows: list[int]) -> list[Speculation]:
        """Just-in-time drafting of K tokens for some rows (the cache misses)."""
        sub = [self.rows[i] for i in rows]
        view = self.neural.cache.take_rows(rows)
        pending = [r.tokens[n:] for r, n in zip(sub, view.lengths.tolist())]
        toks, qs, _ = draft_k(self.draft, view, pending, self.k,
                           lambda logits, step: self._draw(logits, sub, self.fanout[step]))
        # keep the context's KV; the tree re-feeds the last context token and the proposals
        view.lengths[:] = torch.tensor([len(r.tokens) - 1 for r in sub], device=self.draft.device)
        self.neural.cache.put_rows(rows, view)
        q_all = None if qs[0] is None else torch.stack(qs, 1).cpu()
        return [Speculation(toks[j].tolist(), None if r.params.greedy else q_all[j], source="neural")
                for j, r in enumerate(sub)]

    def _draw(self, logits: torch.Tensor, rows: list[DraftRow], top_f: int
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Draw one token per row from the draft's q, under sigma_{F,C} for sampled rows; return
        the tokens (target ids) and the distribution they were drawn from, over the draft head
        (the verifier must use that q, expanded to the target vocabulary)."""
        if all(r.params.greedy for r in rows):
            return self.neural.greedy_tokens(logits), None
        q = draft_probs(logits, [r.params for r in rows])
        if self.c < 1.0 and top_f > 0:
            sampled = torch.tensor([not r.params.greedy for r in rows], device=q.device)
            q = torch.where(sampled[:, None], saguaro_distribution(q, top_f, self.c), q)
        return self.neural.head_to_target(sample(q, [r.generator for r in rows])), q

    # ------------------------------------------------------------------ the tree
    @torch.inference_mode()
    def build_tree(self) -> None:
        """Pre-draft every row's likely outcomes of the speculation now being verified."""
        t = time.perf_counter()
        try:
            self._build_tree()
        finally:
            self.tree_s = time.perf_counter() - t

    def _build_tree(self) -> None:
        if not self.rows:
            return
        k, cache = self.k, self.neural.cache
        b = len(self.rows)
        specs = [r.speculation for r in self.rows]
        # 1. main rows: feed the unseen context and the speculation, read q_1..q_{K+1}
        pending = [r.tokens[int(cache.lengths[i]):] + s.tokens for i, (r, s) in enumerate(zip(self.rows, specs))]
        ids, counts = right_pad(pending)
        dev = self.draft.device
        counts = counts.to(dev)
        at = (counts - k - 1)[:, None] + torch.arange(k + 1, device=dev)
        logits = self.draft(ids.to(dev), cache, logits_at=at)  # [B, K+1, V_draft]
        n = torch.tensor([len(r.tokens) for r in self.rows], device=dev)  # context lengths
        cache.lengths[:] = n + k
        # 2. outcome candidates, in draft-head indices (mapped to target ids below)
        spec_tok = torch.tensor([s.tokens for s in specs], device=dev)  # [B, K]
        out_ids = self.draft.output_token_ids
        to_head = spec_tok if self.head_index is None else self.head_index[spec_tok]
        branch_k, branch_t = [], []
        for j, f in enumerate(self.fanout):
            if f == 0:
                continue
            scores = logits[:, j].float().clone()
            if j < k:  # a rejected position never emits the draft's own token
                col = to_head[:, j]
                ok = (col >= 0).nonzero()[:, 0]
                scores[ok, col[ok]] = float("-inf")
            top = scores.topk(min(f, scores.shape[-1]), dim=-1).indices  # [B, f]
            branch_t.append(top if out_ids is None else out_ids[top])
            branch_k += [j] * top.shape[1]
        if not branch_t:  # zero budget: every outcome will miss
            return
        tok0 = torch.cat(branch_t, 1)  # [B, N] first token of each branch
        nb = tok0.shape[1]
        kb = torch.tensor(branch_k, device=dev)  # [N]
        # 3. K tokens per branch, one forward per depth over every branch of every row
        base = n + k  # first branch slot per row
        span = int(base.max()) + k * nb
        cache.ensure_capacity(span)
        slot_idx = torch.arange(span, device=dev)
        mask = slot_idx[None, None, :] < (n[:, None, None] + kb[None, :, None])  # prefix x + s_1..s_k
        tokens, qs = [], []
        cur = tok0
        for d in range(k):
            slots = base[:, None] + d * nb + torch.arange(nb, device=dev)[None, :]
            mask = mask.clone()
            mask[torch.arange(b, device=dev)[:, None], torch.arange(nb, device=dev)[None, :], slots] = True
            positions = n[:, None] + kb[None, :] + d
            out = self.draft(cur, cache, positions=positions, slots=slots, mask=mask)  # [B, N, V_draft]
            token, q = self._draw(out.reshape(b * nb, -1), [r for r in self.rows for _ in range(nb)], self.fanout[d])
            cur = token.view(b, nb)
            tokens.append(cur)
            qs.append(None if q is None else q.view(b, nb, -1))
        # 4. the speculation cache
        all_tokens = torch.stack(tokens, 2).cpu()  # [B, N, K]
        all_q = None if qs[0] is None else torch.stack(qs, 2).cpu()  # [B, N, K, V]
        kb, tok0 = kb.cpu(), tok0.cpu()
        for i, row in enumerate(self.rows):
            greedy = row.params.greedy
            row.branches = {
                (int(kb[j]), int(tok0[i, j])): Speculation(all_tokens[i, j].tolist(), None if greedy else all_q[i, j])
                for j in range(nb)
            }
