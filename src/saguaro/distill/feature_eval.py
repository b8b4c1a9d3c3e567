"""Held-out acceptance of a feature-conditioned draft, comparable with `evaluate.py`'s for a token draft.

On the target's greedy continuation of a held-out prompt, drafting step d at position i is exactly what
greedy SD would draft there whenever steps 1..d-1 agreed (teacher forcing: the chain's tokens are the
real ones), so the unrolled passes of `FeatureDraft.forward_chains` give every round's accepted length
without running an engine. Greedy SD with a feature draft drafts step 1 from the target's state and
steps 2..K from its own guesses; the reported `mean_accepted_k4` follows those rounds, and `a_p` solves
E[accepted] = a + a^2 + ... + a^K for the per-position acceptance.
"""

from __future__ import annotations

import torch

from saguaro.distill.evaluate import expected_acceptance, labelled_rows, map_to_target, solve_ap
from saguaro.models.feature_draft import FeatureDraft
from saguaro.models.transformer import CausalLM


@torch.inference_mode()
def target_states(target: CausalLM, shard: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Per labelled row, the target's final-norm hidden states [end, H] (as the engine's target computes them)."""
    out = []
    for tokens, _, end in labelled_rows(shard):
        cache = target.new_cache(1, end)
        out.append(target.hidden_states(tokens, cache)[0].float())
    return out


def chain_rounds(matches: list[list[bool]], first: int, end: int, k: int) -> list[int]:
    """Accepted lengths of greedy SD's rounds over positions first..end-2; matches[d][i]: step d+1 drafted
    at position i is the real next token."""
    rounds, n = [], first
    while n < end - 1:
        a = 0
        while a < k and n + a < end - 1 and matches[a][n + a]:
            a += 1
        rounds.append(a)
        n += a + 1
    return rounds


@torch.no_grad()
def feature_report(draft: FeatureDraft, target: CausalLM, shard: dict[str, torch.Tensor],
                   states: list[torch.Tensor], k: int = 4) -> dict[str, float]:
    """Agreement of step 1, mean accepted tokens and a_p of greedy K-token rounds, and 1 - TV(p, q) of step 1."""
    draft.eval()
    head = draft.output_token_ids
    agree, count, rounds, t1 = 0, 0, [], 0.0
    for (tokens, first, end), h in zip(labelled_rows(shard), states, strict=True):
        feats = torch.cat([torch.zeros_like(h[:1]), h[:-1]])[None].to(draft.dtype)
        chains = draft.forward_chains(tokens, feats, k)
        nxt = tokens[0, 1:end]
        matches = [(map_to_target(draft, c[0, : end - 1].argmax(-1)) == nxt).tolist() for c in chains]
        agree += sum(matches[0][first : end - 1])
        count += end - 1 - first
        rounds += chain_rounds(matches, first, end, k)
        p = torch.softmax(target.lm_head(h[first : end - 1].to(target.dtype)).float(), -1)
        p = p if head is None else p[:, head]
        q = torch.softmax(chains[0][0, first : end - 1].float(), -1)
        t1 += float(expected_acceptance(p, q).sum())
    mean = sum(rounds) / max(1, len(rounds))
    return {"agreement": agree / max(1, count), f"mean_accepted_k{k}": mean, "a_p": solve_ap(mean, k),
            "accept_t1": t1 / max(1, count), "positions": count}
