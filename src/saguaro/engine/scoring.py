"""The target's processed distribution at a round's positions, and the log-probs kept with emitted tokens.

Every mode goes through here, so AR, SD and SSD give the same p (and the same reported log-probs)
for the same context: a speculative round's position j sees the committed tokens plus the round's
draft tokens before it.
"""

from __future__ import annotations

import torch

from saguaro.engine.sequence import Sequence
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
