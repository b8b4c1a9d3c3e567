"""Saguaro part 3: the speedup model (the paper's Theorem 7) and the batch size where the fast
backup speculator should replace just-in-time neural drafting on a cache miss.

Times are in units of one target verification. A round where every sequence hits the speculation
cache takes max(1, T_p) (the draft works while the target verifies); if any sequence misses, the
round also waits for the backup. The paper charges a miss 1 + T_b; our worker answers only once its
tree is built, so a miss costs max(1, T_p) + T_b, which is the paper's form whenever the tree fits
inside a verification (T_p <= 1). With batch b a round is all-hit with probability p_hit^b.
"""

from __future__ import annotations


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens per round of SD with per-token acceptance a and lookahead k: (1 - a^(k+1)) / (1 - a)."""
    if acceptance >= 1.0:
        return k + 1.0
    return (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


def ssd_speedup(p_hit: float, tokens_hit: float, tokens_miss: float, t_primary: float, t_backup: float,
                batch: int = 1) -> float:
    """Expected tokens per unit of verification time (per sequence)."""
    p_all = p_hit ** batch
    tokens = p_hit * tokens_hit + (1.0 - p_hit) * tokens_miss
    time = max(1.0, t_primary) + (1.0 - p_all) * t_backup
    return tokens / time


def fallback_switch_batch(p_hit: float, tokens_hit: float, t_primary: float, tokens_neural: float,
                          t_neural: float, tokens_ngram: float, t_ngram: float, max_batch: int = 1024) -> int | None:
    """b*: the smallest batch where the n-gram backup beats just-in-time neural drafting on a miss."""
    for b in range(1, max_batch + 1):
        neural = ssd_speedup(p_hit, tokens_hit, tokens_neural, t_primary, t_neural, b)
        ngram = ssd_speedup(p_hit, tokens_hit, tokens_ngram, t_primary, t_ngram, b)
        if ngram >= neural:
            return b
    return None
