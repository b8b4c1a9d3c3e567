"""The request's logits processors, as pure tensor functions over [rows, positions, vocab].

They follow vLLM (and OpenAI for presence/frequency): logit bias is added first; the repetition
penalty divides a positive logit (multiplies a negative one) of every token seen in the prompt or
the output; the frequency and presence penalties subtract `frequency * count + presence * (count > 0)`
over the output tokens only; min_p drops tokens below min_p times the top token's probability.

Under speculation each of a round's K+1 target positions has its own context: position j also saw
the round's draft tokens before it (`counts_with_drafts`). That is what keeps SD and SSD exact with
context-dependent processors (docs/exactness.md).
"""

from __future__ import annotations

import torch


def token_counts(rows: list[list[int]], vocab: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[B, V]: how often each token occurs in each row."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), vocab, dtype=torch.long)  # padding counts in a spare column
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    counts = torch.zeros(len(rows), vocab + 1, dtype=dtype)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=dtype))
    return counts[:, :vocab].to(device)


def counts_with_drafts(counts: torch.Tensor, drafts: torch.Tensor | None, positions: int) -> torch.Tensor:
    """[B, V] counts of the committed tokens -> [B, P, V], position j adding the drafts[:, :j] before it."""
    out = counts[:, None].expand(-1, positions, -1)
    if drafts is None or positions == 1:
        return out
    earlier = torch.nn.functional.one_hot(drafts[:, : positions - 1], counts.shape[-1]).to(counts.dtype).cumsum(1)
    return out + torch.cat([torch.zeros_like(earlier[:, :1]), earlier], 1)


def apply_logit_bias(logits: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """logits [B, P, V] + bias [B, V] at every position."""
    return logits + bias[:, None].to(logits.dtype)


def apply_penalties(logits: torch.Tensor, output_counts: torch.Tensor, seen: torch.Tensor, repetition: torch.Tensor,
                    frequency: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """logits [B, P, V]; output_counts [B, P, V] (output tokens only); seen [B, P, V] (prompt or output);
    repetition, frequency, presence [B]."""
    rep = repetition.to(logits.dtype)[:, None, None]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    counts = output_counts.to(logits.dtype)
    return (logits - frequency.to(logits.dtype)[:, None, None] * counts
            - presence.to(logits.dtype)[:, None, None] * (counts > 0).to(logits.dtype))


def min_p_drop(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """probs [B, P, V], min_p [B] -> where a token falls below min_p times its position's top probability."""
    return probs < min_p.to(probs.dtype)[:, None, None] * probs.amax(-1, keepdim=True)


def top_k_drop(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """logits [B, P, V], k [B] (V: no cut) -> where a token is outside its position's k largest."""
    kth = logits.sort(-1, descending=True).values.gather(-1, (k - 1)[:, None, None].expand(-1, logits.shape[1], 1))
    return logits < kth


def top_p_drop(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """probs [B, P, V], top_p [B] -> where a token is outside the smallest set of top tokens holding top_p
    of the mass (the top token is always kept; rows with top_p >= 1 drop nothing)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly above each token
    limit = top_p.to(probs.dtype)[:, None, None]
    drop_sorted = (before >= limit) & (limit < 1)
    return torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
