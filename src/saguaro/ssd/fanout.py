"""Saguaro part 1: how many outcome branches to pre-draft at each verification outcome k.

If a branch set of size F at one position misses the real outcome with probability F^-r, and
outcome k (k accepted, then a rejection) has probability a^k (1 - a) for k < K and a^K for k = K,
then maximising the hit probability under sum_k F_k = B gives F_k proportional to P(k)^(1/(1+r)):
F_k = F_0 a^(k/(1+r)) for k < K and F_K = F_0 a^(K/(1+r)) (1 - a)^(-1/(1+r)).
"""

from __future__ import annotations

import math


def geometric_weights(k: int, acceptance: float, r: float) -> list[float]:
    """Unnormalised optimal fan-out for outcomes 0..k."""
    if not 0 < acceptance < 1:
        raise ValueError(f"acceptance rate must be in (0, 1), got {acceptance}")
    if r <= 0:
        raise ValueError(f"power-law exponent r must be > 0, got {r}")
    e = 1.0 / (1.0 + r)
    weights = [acceptance ** (i * e) for i in range(k)]
    weights.append(acceptance ** (k * e) * (1.0 - acceptance) ** (-e))
    return weights


def round_to_budget(weights: list[float], budget: int) -> list[int]:
    """Integers proportional to `weights` that sum to `budget` (largest remainder)."""
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    total = sum(weights)
    exact = [budget * w / total for w in weights]
    out = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: exact[i] - out[i], reverse=True)
    for i in by_remainder[: budget - sum(out)]:
        out[i] += 1
    return out


def geometric_fanout(budget: int, k: int, acceptance: float, r: float) -> list[int]:
    """F_0..F_K for lookahead k, summing to `budget`."""
    return round_to_budget(geometric_weights(k, acceptance, r), budget)


def uniform_fanout(budget: int, k: int) -> list[int]:
    return round_to_budget([1.0] * (k + 1), budget)
