"""Fitting Saguaro's knobs online: a_p and r shape the fan-out, measured latencies pick the fallback.

The fit functions are pure; `SaguaroPolicy` keeps the running counts an engine observes round by
round and turns them into the next round's fan-out and fallback; `BandedPolicy` keeps one per
temperature band.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from dataclasses import dataclass, field

from saguaro.ssd.fanout import geometric_fanout, uniform_fanout
from saguaro.ssd.speedup import expected_tokens, fallback_switch_batch

FALLBACKS = ("neural", "ngram", "none")  # how a cache miss is drafted; "auto" (the policy's) picks the first two
PRIOR_ACCEPTANCE = 0.6  # a_p before anything is measured
PRIOR_R = 0.5  # power-law exponent r of misses vs fan-out before anything is measured
R_RANGE = (0.1, 4.0)  # keep the fitted exponent where the closed form stays well-behaved
ACCEPTANCE_RANGE = (0.02, 0.98)
EXPLORE_MISSED_ROUNDS = 4  # missed rounds each backup gets before the model chooses between them
TREE_SHARE = 0.8  # the share of a verification an adaptive budget's tree aims to take
MAX_BUDGET = 256


def fit_acceptance(accepted: int, drafted: int, prior: float, prior_weight: float = 32.0) -> float:
    """Per-token acceptance, shrunk towards the prior while there is little data."""
    a = (accepted + prior * prior_weight) / (drafted + prior_weight)
    return min(max(a, ACCEPTANCE_RANGE[0]), ACCEPTANCE_RANGE[1])


def fit_power_law(lookups: dict[int, int], hits: dict[int, int]) -> float | None:
    """r in 1 - p_hit(F) = F^-r from hit counts per fan-out F (least squares on log-miss vs log F,
    through the origin, weighted by lookups). None if no fan-out above 1 has been observed."""
    num = den = 0.0
    for f, n in lookups.items():
        if f < 2 or n == 0:
            continue
        miss = (n - hits.get(f, 0) + 0.5) / (n + 1.0)  # smoothed: never log(0)
        x = math.log(f)
        num += n * x * -math.log(miss)
        den += n * x * x
    if den == 0:
        return None
    return min(max(num / den, R_RANGE[0]), R_RANGE[1])


def fit_budget(budget: int, tree_s: float, verify_s: float, k: int, share: float = TREE_SHARE,
               max_budget: int = MAX_BUDGET) -> int:
    """The branch budget whose tree takes `share` of a verification.

    More branches hit more often, and a tree that ends before the verification costs nothing; one
    that outlasts it delays every round. Tree time is taken as proportional to the budget, and one
    step changes the budget by at most 2x, so a noisy timing cannot swing it far."""
    if tree_s <= 0 or verify_s <= 0:
        return budget
    scale = min(2.0, max(0.5, share * verify_s / tree_s))
    return int(min(max_budget, max(k + 1, round(budget * scale))))


@dataclass
class FallbackCosts:
    """What the fallback choice needs, times in units of one verification."""

    p_hit: float
    tokens_hit: float  # tokens per round after a hit
    t_primary: float  # tree build
    tokens_neural: float
    t_neural: float
    tokens_ngram: float
    t_ngram: float


def choose_fallback(batch: int, costs: FallbackCosts) -> str:
    """'ngram' from the batch size b* where the fast backup beats just-in-time neural drafting."""
    b_star = fallback_switch_batch(costs.p_hit, costs.tokens_hit, costs.t_primary, costs.tokens_neural,
                                   costs.t_neural, costs.tokens_ngram, costs.t_ngram)
    return "ngram" if b_star is not None and batch >= b_star else "neural"


@dataclass
class Tally:
    rounds: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def add(self, tokens: int, seconds: float = 0.0) -> None:
        self.rounds += 1
        self.tokens += tokens
        self.seconds += seconds

    def mean_tokens(self, prior: float) -> float:
        return (self.tokens + prior) / (self.rounds + 1)


@dataclass
class SaguaroPolicy:
    """Observes rounds; says the fan-out and the fallback for the next one.

    fit=False keeps a_p and r at their priors (the fan-out never changes); fallback 'auto'
    picks neural or n-gram per round from the measured costs and the batch size; adapt_budget
    resizes the budget at every refit so the tree takes TREE_SHARE of a verification.
    """

    k: int
    budget: int
    acceptance: float = PRIOR_ACCEPTANCE
    r: float = PRIOR_R
    shape: str = "geometric"
    fallback: str = "auto"
    fit: bool = True
    refit_every: int = 8
    adapt_budget: bool = False
    drafted: int = 0
    accepted: int = 0
    lookups: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    hits: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    after_hit: Tally = field(default_factory=Tally)
    after_miss: dict[str, Tally] = field(default_factory=lambda: defaultdict(Tally))
    tree_s: float = 0.0
    verify: Tally = field(default_factory=Tally)
    rounds: int = 0
    window_tree_s: float = 0.0  # since the last refit
    window_verify_s: float = 0.0

    def __post_init__(self):
        self.fanout = self._shape(self.acceptance, self.r)

    @classmethod
    def fixed(cls, fanout: list[int], fallback: str) -> SaguaroPolicy:
        """A policy that keeps this fan-out and fallback (no fitting, no switching)."""
        policy = cls(len(fanout) - 1, sum(fanout), fallback=fallback, fit=False)
        policy.fanout = list(fanout)
        return policy

    def _shape(self, a: float, r: float) -> list[int]:
        if self.shape == "uniform":
            return uniform_fanout(self.budget, self.k)
        return geometric_fanout(self.budget, self.k, a, r)

    def observe(self, accepted: int, drafted: int, outcome_k: int | None, hit: bool | None, source: str,
                fanout_used: list[int]) -> None:
        """One sequence's round: its acceptance, and whether the outcome it came from was cached."""
        self.drafted += drafted
        self.accepted += accepted
        if hit is None:  # the first round after prefill looks nothing up
            return
        (self.after_hit if hit else self.after_miss[source]).add(accepted + 1)
        if outcome_k is not None:
            f = fanout_used[outcome_k]
            self.lookups[f] += 1
            self.hits[f] += int(hit)

    def observe_times(self, verify_s: float, tree_s: float, fallback_s: float, source: str, misses: int) -> None:
        self.verify.add(0, verify_s)
        self.tree_s += tree_s
        self.window_tree_s += tree_s
        self.window_verify_s += verify_s
        if misses:
            self.after_miss[source].seconds += fallback_s
        self.rounds += 1
        if self.fit and self.rounds % self.refit_every == 0:
            if self.adapt_budget:
                self.budget = fit_budget(self.budget, self.window_tree_s, self.window_verify_s, self.k)
            self.window_tree_s = self.window_verify_s = 0.0
            a = fit_acceptance(self.accepted, self.drafted, self.acceptance)
            r = fit_power_law(self.lookups, self.hits) or self.r
            self.fanout = self._shape(a, r)

    @property
    def fitted(self) -> tuple[float, float]:
        return fit_acceptance(self.accepted, self.drafted, self.acceptance), fit_power_law(self.lookups, self.hits) or self.r

    def costs(self) -> FallbackCosts:
        v = self.verify.seconds / self.verify.rounds if self.verify.rounds else 1.0
        a, _ = self.fitted
        lookups = sum(self.lookups.values())
        p_hit = (sum(self.hits.values()) + 0.5) / (lookups + 1.0)
        neural, ngram = self.after_miss["neural"], self.after_miss["ngram"]

        def per_round(t: Tally, prior: float) -> float:  # seconds per missed round, in verify units
            return (t.seconds / t.rounds if t.rounds else prior) / v

        return FallbackCosts(
            p_hit=p_hit,
            tokens_hit=self.after_hit.mean_tokens(expected_tokens(a, self.k)),
            t_primary=(self.tree_s / self.rounds if self.rounds else 0.5 * v) / v,
            tokens_neural=neural.mean_tokens(expected_tokens(a, self.k)),
            t_neural=per_round(neural, 0.5 * v),
            tokens_ngram=ngram.mean_tokens(1.0),  # prior: the n-gram backup rarely helps
            t_ngram=per_round(ngram, 0.0),
        )

    def next_fallback(self, batch: int) -> str:
        """'auto': try each backup on a few missed rounds first (priors alone could rule one out
        without ever measuring it), then follow b* from the measured costs."""
        if self.fallback != "auto":
            return self.fallback
        for backup in ("neural", "ngram"):
            if self.after_miss[backup].rounds < EXPLORE_MISSED_ROUNDS:
                return backup
        return choose_fallback(batch, self.costs())


class BandedPolicy:
    """Saguaro's knobs fitted per temperature band, each band a SaguaroPolicy of its own.

    A sampled row keeps a drafted token with probability 1 - TV(p, q), well below a greedy row's argmax
    agreement, and its outcomes spread over more tokens, so it hits a cache of the same fan-out less
    often: one fit over pooled rounds would shape the fan-out (and pick the fallback) for neither. A
    round takes its fan-out and fallback from its rows' band, "sampled" as soon as one row samples; each
    row's outcome teaches its own band, and the round's times the band that chose for it."""

    def __init__(self, policy: SaguaroPolicy):
        self.bands = {"greedy": policy, "sampled": copy.deepcopy(policy)}
        self.band = "greedy"

    def select(self, sampled_rows: int) -> SaguaroPolicy:
        """The band of a round with `sampled_rows` rows at T > 0, made current."""
        self.band = "sampled" if sampled_rows else "greedy"
        return self.bands[self.band]

    @property
    def current(self) -> SaguaroPolicy:
        return self.bands[self.band]

    @property
    def fanout(self) -> list[int]:
        return self.current.fanout

    @property
    def fitted(self) -> dict[str, tuple[float, float]]:
        """(a_p, r) per band."""
        return {band: policy.fitted for band, policy in self.bands.items()}

    @property
    def rounds(self) -> int:
        return sum(policy.rounds for policy in self.bands.values())

    def next_fallback(self, batch: int) -> str:
        return self.current.next_fallback(batch)

    def observe(self, accepted: int, drafted: int, outcome_k: int | None, hit: bool | None, source: str,
                fanout_used: list[int], sampled: bool = False) -> None:
        self.bands["sampled" if sampled else "greedy"].observe(accepted, drafted, outcome_k, hit, source, fanout_used)

    def observe_times(self, verify_s: float, tree_s: float, fallback_s: float, source: str, misses: int) -> None:
        self.current.observe_times(verify_s, tree_s, fallback_s, source, misses)
