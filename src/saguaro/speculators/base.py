"""Speculators propose K tokens per running sequence, and the distribution q they drew them from.

Rows follow the engine's running batch: `prefill` appends rows, `retire` keeps some, `commit`
tells each row how many of its proposed tokens the target accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from saguaro.sampling import SamplingParams


class Row(Protocol):
    """What a speculator reads of a running sequence (the engine's Sequence is one)."""

    params: SamplingParams
    generator: torch.Generator | None

    @property
    def all_ids(self) -> list[int]: ...


@dataclass
class Proposal:
    tokens: torch.Tensor  # [B, K]
    q: torch.Tensor | None  # [B, K, V] over the target's vocabulary; None = deterministic (one-hot)
    lengths: torch.Tensor | None = None  # [B]: row i proposes tokens[i, :lengths[i]]; None = all K
    from_lookup: bool = False  # prompt lookup proposed these, not the speculator's model (counted apart)


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


def repeat_last(tokens: list[int], k: int) -> list[int]:
    """tokens (not empty) padded to k by repeating the last: a proposal of fixed width whose padding,
    past the row's length, is never verified."""
    return tokens + tokens[-1:] * (k - len(tokens))


def right_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids [B, W] right-padded with 0, lengths [B]), both on the CPU: the batch a
    model forward takes, with `logits_at=(lengths - 1)[:, None]` reading each row's last token."""
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids, lengths


class Speculator:
    # Whether the engine passes the target's final-norm hidden states to `prefill` and `commit` (a
    # feature-conditioned draft reads them; they cost the engine nothing it does not compute anyway).
    needs_target_states = False

    def prefill(self, seqs: list[Row], ids: torch.Tensor, lengths: torch.Tensor,
                states: torch.Tensor | None = None) -> None:
        """New sequences (prompts in `ids`, right-padded) join the batch as rows at the end; states
        [B, T, H]: the target's at every prompt position (when `needs_target_states`)."""

    def propose(self, seqs: list[Row], k: int) -> Proposal:
        """Up to k tokens per row (fewer where the speculator stops early: `Proposal.lengths`)."""
        raise NotImplementedError

    def commit(self, accepted: list[int], states: torch.Tensor | None = None) -> None:
        """Row i's first accepted[i] proposed tokens were kept (then the target emitted one of its own);
        states [B, K+1, H]: the target's at the verified positions (when `needs_target_states`)."""

    def decoded_plainly(self, states: torch.Tensor | None = None) -> None:
        """The target decoded one token per row without speculating (mode auto's AR rounds); states
        [B, 1, H]: its state at each row's fed token (when `needs_target_states`)."""

    def retire(self, keep: list[int]) -> None:
        """Only rows `keep` remain, in this order."""
