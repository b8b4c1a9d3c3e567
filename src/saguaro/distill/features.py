"""Teacher forcing that also keeps the target's hidden states: the data of a feature-conditioned draft.

A feature-conditioned (EAGLE-style) draft predicts the next token from the target's final hidden state
at the previous position and the current token, so its training data needs those states. The target
computes them anyway when it scores a text; this keeps them next to the labels of `forced.py`.

Shard format: the teacher-forced one (`forced.py`) plus
  features [F, H] bfloat16: the final-norm hidden state at positions 0 .. end-2 of each row, row after row
  feature_offsets [N+1]: where each row's features start.
H = 576 costs 1152 bytes per token in bfloat16, six times a token's top-32 labels.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from saguaro.distill.corpora import Text
from saguaro.distill.forced import empty_labels, length_batches, pack_shard, pad_tokens, topk_with_tail
from saguaro.models.transformer import CausalLM


def has_features(path: Path) -> bool:
    with safe_open(str(path), "pt") as f:
        return "features" in f.keys()


@torch.inference_mode()
def score_with_features(target: CausalLM, texts: list[Text], k: int, chunk: int = 128
                        ) -> list[tuple[torch.Tensor, ...]]:
    """Per text, (features [end-1, H] bf16, top-k ids, log-probabilities, outside mass at its labels).

    Like `forced.score_batch`: `chunk` positions at a time through the KV cache, the head only on
    labelled positions."""
    tokens = pad_tokens(texts).to(target.device)
    n, width = tokens.shape
    first = torch.tensor([t.prompt_length - 1 for t in texts])
    last = torch.tensor([len(t.tokens) - 1 for t in texts])
    cache = target.new_cache(n, width)
    feats: list[list[torch.Tensor]] = [[] for _ in texts]
    labels: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in texts]
    for s in range(0, width, chunk):
        e = min(s + chunk, width)
        h = target.hidden_states(tokens[:, s:e], cache).cpu()
        cache.lengths += e - s
        at = torch.arange(s, e)
        for i in range(n):
            feats[i].append(h[i, : max(0, min(e, int(last[i])) - s)].to(torch.bfloat16))
        keep = (at >= first[:, None]) & (at < last[:, None])
        if not keep.any():
            continue
        scored = topk_with_tail(target.lm_head(h[keep]), k)
        counts = keep.sum(1).tolist()
        for i, piece in enumerate(zip(*(x.split(counts) for x in scored))):
            if counts[i]:
                labels[i].append(piece)
    return [(torch.cat(f), *(tuple(torch.cat(xs) for xs in zip(*lab)) if lab else empty_labels(k)))
            for f, lab in zip(feats, labels)]


def feature_shard(target: CausalLM, texts: list[Text], k: int, batch_tokens: int = 4096) -> dict[str, torch.Tensor]:
    """Score `texts` (batched by length) and pack labels and features as one shard, rows in length order."""
    texts = [t for t in texts if t.labels > 0]
    batches = length_batches(texts, batch_tokens)
    ordered = [texts[i] for b in batches for i in b]
    scored = [x for b in batches for x in score_with_features(target, [texts[i] for i in b], k)]
    shard = pack_shard(ordered, [x[1:] for x in scored], k)
    counts = torch.tensor([len(x[0]) for x in scored], dtype=torch.long)
    shard["features"] = torch.cat([x[0] for x in scored]) if scored else torch.zeros(0, 0, dtype=torch.bfloat16)
    shard["feature_offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    return shard


def read_features(path: Path, start: int, stop: int) -> torch.Tensor:
    """Packed feature rows [start, stop) of a feature shard."""
    with safe_open(str(path), "pt") as f:
        return f.get_slice("features")[start:stop]


def read_feature_offsets(path: Path) -> torch.Tensor:
    with safe_open(str(path), "pt") as f:
        return f.get_tensor("feature_offsets")
