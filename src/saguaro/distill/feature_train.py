"""Training a feature-conditioned draft (`models/feature_draft.py`) on feature shards (`features.py`).

The batches are the teacher-forced ones plus the target's hidden states, shifted by one (position i reads
the state at i-1). The loss is `tail_loss` of every unrolled drafting step, averaged: step d at position
i counts only where its chain starts at or after the last prompt token (the chain's first state is then
a real one the engine would have).
"""

from __future__ import annotations

from pathlib import Path

import torch

from saguaro.distill.features import read_feature_offsets, read_features
from saguaro.distill.forced import read_index
from saguaro.distill.train import Trainer, make_forced_batch, tail_loss


def shifted_features(path: Path, offsets: torch.Tensor, row: int, width: int, hidden: int) -> torch.Tensor:
    """[width, H]: row's target state at i-1 for each position i (zeros at 0 and past the stored ones)."""
    start, stop = int(offsets[row]), int(offsets[row + 1])
    stop = min(stop, start + width - 1)
    out = torch.zeros(width, hidden, dtype=torch.bfloat16)
    out[1 : 1 + stop - start] = read_features(path, start, stop)
    return out


def step_weights(weight: torch.Tensor, depth: int) -> list[torch.Tensor]:
    """Loss weights of steps 1..depth: step d at i counts if i is labelled and its chain start i-d+1 is."""
    out = []
    for d in range(1, depth + 1):
        start = torch.zeros_like(weight)
        start[:, d - 1 :] = weight[:, : weight.shape[1] - d + 1]
        out.append(weight * start)
    return out


def chain_loss(chains: list[torch.Tensor], ids, probs, outside, weight, index) -> torch.Tensor:
    """Mean over drafting steps of the tail loss of each step's logits (steps with no weight skipped).

    chains[d]: step d+1's logits [B, T, V], or [M, V] at the positions step_weights(weight) selects."""
    losses = []
    for logits, w in zip(chains, step_weights(weight, len(chains))):
        if w.sum() == 0:
            continue
        if logits.dim() == 2:  # only the weighted positions
            sel = w > 0
            losses.append(tail_loss(logits.float(), ids[sel], probs[sel], outside[sel], w[sel], index))
        else:
            losses.append(tail_loss(logits.float(), ids, probs, outside, w, index))
    return torch.stack(losses).mean()


def labelled_logits(draft, tokens, feats, weight, depth: int) -> list[torch.Tensor]:
    """Each step's logits [M, V] at the positions its loss weighs only: the head (8192 wide) and the loss
    over it are most of a step's cost, and a chat sequence's context half is not labelled."""
    guesses = draft.forward_chains(tokens, feats, depth, heads=False)
    return [draft.lm_head(g[w > 0]) for g, w in zip(guesses, step_weights(weight, depth))]


class FeatureTrainer(Trainer):
    """Trainer over feature shards; `depth` drafting steps unrolled per batch."""

    def __init__(self, *args, depth: int = 3, **kwargs):
        super().__init__(*args, **kwargs)
        self.depth = depth

    def _add_shard(self, path: Path, source: int) -> None:
        self.forced = True
        self._shard_files.append(path)
        self._shard_source.append(source)
        index = read_index(path)
        index["feature_offsets"] = read_feature_offsets(path)
        self._shards.append(index)

    def next_batch(self):
        rows = self.next_rows()
        tokens, ids, probs, outside, weight = make_forced_batch(self._shards, self._shard_files, rows, self.max_len)
        hidden = self.draft.config.hidden_size
        feats = torch.stack([shifted_features(self._shard_files[s], self._shards[s]["feature_offsets"], r,
                                              tokens.shape[1], hidden) for s, r in rows])
        return (weight, lambda m: labelled_logits(m, tokens, feats, weight, self.depth),
                lambda out: chain_loss(out, ids, probs, outside, weight, self.index))
