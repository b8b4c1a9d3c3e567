"""The target's processed distribution at a round's positions, and the log-probs kept with emitted tokens.

Every mode goes through here, so AR, SD and SSD give the same p (and the same reported log-probs)
for the same context: a speculative round's position j sees the committed tokens plus the round's
draft tokens before it.
"""

from __future__ import annotations

import torch

from collections.abc import Callable

from saguaro.engine.sequence import Sequence
from saguaro.engine.verify import verify, verify_greedy
from saguaro.sampling import History, TokenLogprob, target_distribution, token_logprobs


def round_distribution(logits: torch.Tensor, seqs: list[Sequence], drafts: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [B, V] or [B, K+1, V] (drafts [B, K]) -> (p to sample or verify with, log p if a row asks)."""
    params = [s.params for s in seqs]
    history = None
    if any(p.needs_history for p in params):
        history = History([s.prompt_ids for s in seqs], [s.output_ids for s in seqs],
                          None if drafts is None else drafts.to(logits.device))
    return target_distribution(logits, params, history, logprobs=any(p.logprobs is not None for p in params))


def emitted_logprobs(logp: torch.Tensor | None, seqs: list[Sequence], tokens: list[list[int]]
                     ) -> list[list[TokenLogprob] | None]:
    """The log-probs of each row's emitted tokens (tokens[i][j] at position j of logp [B, P, V])."""
    if logp is None:
        return [None] * len(seqs)
    if logp.dim() == 2:
        logp = logp[:, None]
    return token_logprobs(logp, tokens, [s.params.logprobs for s in seqs])


def greedy_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor | None:
    """The target's greedy token at every position of logits [B, ..., V] when every row is greedy, with
    no logit processor and no log-probs asked: p is then one-hot on these, the same argmax that
    `target_distribution` takes, so a round needs no softmax over the vocabulary (~2 ms a round for
    a 49k vocabulary on a CPU). None otherwise."""
    if not all(s.params.greedy and s.params.logprobs is None and not s.params.logit_bias
               and not s.params.needs_history for s in seqs):
        return None
    return logits.argmax(-1)  # half-precision logits widen exactly: the same argmax


def verify_round(logits: torch.Tensor, seqs: list[Sequence], drafts: torch.Tensor,
                 draft_q: Callable[[torch.Tensor], torch.Tensor | None] = lambda p: None,
                 lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One speculative round's verification: logits [B, K+1, V] of the target over drafts [B, K] ->
    (accepted [B], emitted token [B], log p or None). draft_q(p) gives the q the drafts were sampled
    from (None: deterministic drafts); lengths [B]: how many of its K each row proposed (None: all).
    All-greedy rounds skip the vocabulary-wide probabilities."""
    if (targets := greedy_tokens(logits, seqs)) is not None:
        accepted, emitted = verify_greedy(drafts.to(targets.device), targets, lengths)
        return accepted, emitted, None
    p, logp = round_distribution(logits, seqs, drafts)  # position j sees drafts 1..j-1 too
    accepted, emitted = verify(drafts.to(p.device), draft_q(p), p, [s.generator for s in seqs], lengths)
    return accepted, emitted, logp
