"""How well a draft predicts its target: greedy agreement a_p and mean accepted length at K.

Both come from teacher forcing on the target's own greedy continuations of held-out prompts:
when the draft agrees with the target it has, by construction, the same context as in real
speculative decoding, so the simulated acceptance is exact for greedy SD.
"""

from __future__ import annotations

import torch

from saguaro.models.transformer import CausalLM


def map_to_target(draft: CausalLM, ids: torch.Tensor) -> torch.Tensor:
    return ids if draft.output_token_ids is None else draft.output_token_ids[ids]


@torch.no_grad()
def match_sequences(draft: CausalLM, shard: dict[str, torch.Tensor]) -> list[list[bool]]:
    """Per row, whether the draft's argmax equals the target's greedy token at each generated position."""
    out = []
    for r in range(shard["tokens"].shape[0]):
        end, first = int(shard["ends"][r]), int(shard["prompt_lengths"][r]) - 1
        if end - 1 <= first:
            continue
        tokens = shard["tokens"][r : r + 1, :end].long()
        pred = map_to_target(draft, draft.forward_train(tokens)[0].argmax(-1))
        out.append((pred[first : end - 1] == tokens[0, first + 1 : end]).tolist())
    return out


def accepted_lengths(matches: list[bool], k: int) -> list[int]:
    """Accepted draft tokens of each greedy SD round with lookahead k over one match sequence."""
    rounds, i = [], 0
    while i < len(matches):
        a = 0
        while a < k and i + a < len(matches) and matches[i + a]:
            a += 1
        rounds.append(a)
        i += a + 1
    return rounds


def agreement_report(draft: CausalLM, shard: dict[str, torch.Tensor], k: int = 4) -> dict[str, float]:
    seqs = match_sequences(draft, shard)
    flat = [m for s in seqs for m in s]
    rounds = [a for s in seqs for a in accepted_lengths(s, k)]
    return {
        "agreement": sum(flat) / max(1, len(flat)),
        f"mean_accepted_k{k}": sum(rounds) / max(1, len(rounds)),
        "positions": len(flat),
    }


@torch.inference_mode()
def decode_step_ms(models: dict[str, CausalLM], context: int = 128, steps: int = 32) -> dict[str, float]:
    """Median ms of one cached 1-token forward per model, measured interleaved (same machine drift)."""
    import statistics
    import time

    caches, times = {}, {name: [] for name in models}
    for name, m in models.items():
        caches[name] = m.new_cache(1, context + steps + 1)
        m(torch.randint(0, 1000, (1, context)), caches[name])
        caches[name].lengths[:] = context
    token = torch.tensor([[42]])
    for _ in range(steps):
        for name, m in models.items():
            t = time.perf_counter()
            m(token, caches[name])
            times[name].append(1000 * (time.perf_counter() - t))
            caches[name].lengths += 1
    return {name: statistics.median(ts) for name, ts in times.items()}
