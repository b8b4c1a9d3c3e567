"""How well a draft predicts its target: greedy agreement a_p, mean accepted length at K, and the
expected acceptance of one drafted token at temperature 1 (1 - TV(p, q)).

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


def expected_acceptance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Probability that speculative sampling accepts a token drafted from q against target p: 1 - TV(p, q).

    p, q: [..., V] distributions over the same vocabulary; sum_x min(p(x), q(x)) = 1 - TV(p, q).
    """
    return torch.minimum(p, q).sum(-1)


def labelled_rows(shard: dict[str, torch.Tensor]):
    """(tokens [1, end], first, end) of each row with generated tokens; positions first..end-2 are scored."""
    for r in range(shard["tokens"].shape[0]):
        end, first = int(shard["ends"][r]), int(shard["prompt_lengths"][r]) - 1
        if end - 1 > first:
            yield shard["tokens"][r : r + 1, :end].long(), first, end


@torch.no_grad()
def target_probs(target: CausalLM, shard: dict[str, torch.Tensor], head_ids: torch.Tensor | None) -> list[torch.Tensor]:
    """Per labelled row, the target's T=1 distribution at its scored positions, on the draft's head only.

    Only the head matters: q (the draft's distribution expanded to the target's vocabulary) is zero off
    it, and min(p, 0) = 0. Computed once per run and reused by every evaluation (the target's forward
    over the held-out rows is the costly part).
    """
    out = []
    for tokens, first, end in labelled_rows(shard):
        p = torch.softmax(target.forward_train(tokens)[0, first : end - 1].float(), -1)
        out.append(p if head_ids is None else p[:, head_ids])
    return out


@torch.no_grad()
def acceptance_t1(draft: CausalLM, shard: dict[str, torch.Tensor], p_rows: list[torch.Tensor]) -> dict[str, float]:
    """Mean expected acceptance of one drafted token at temperature 1 (1 - TV(p, q)) over the shard's
    generated positions; p_rows from `target_probs` with this draft's head. The contexts are the target's
    greedy continuations, the same positions as the greedy agreement."""
    total, count = 0.0, 0
    for (tokens, first, end), p in zip(labelled_rows(shard), p_rows, strict=True):
        q = torch.softmax(draft.forward_train(tokens)[0, first : end - 1].float(), -1)
        total += float(expected_acceptance(p, q).sum())
        count += end - 1 - first
    return {"accept_t1": total / max(1, count), "positions": count}


def solve_ap(mean_accepted: float, k: int) -> float:
    """The per-position acceptance a with a + a^2 + ... + a^k = mean_accepted (bisection)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(mid ** j for j in range(1, k + 1)) < mean_accepted else (lo, mid)
    return (lo + hi) / 2


def agreement_report(draft: CausalLM, shard: dict[str, torch.Tensor], k: int = 4) -> dict[str, float]:
    seqs = match_sequences(draft, shard)
    flat = [m for s in seqs for m in s]
    rounds = [a for s in seqs for a in accepted_lengths(s, k)]
    mean = sum(rounds) / max(1, len(rounds))
    return {"agreement": sum(flat) / max(1, len(flat)), f"mean_accepted_k{k}": mean, "a_p": solve_ap(mean, k),
            "positions": len(flat)}


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
