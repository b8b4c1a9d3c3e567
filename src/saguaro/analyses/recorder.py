"""Round-by-round records of an SSD engine, taken by wrapping its drafter (the engine is unchanged).

For every cache lookup: the outcome position k (k draft tokens accepted, then the target's own
token), whether it hit, and, with the in-process drafter, the rank of the emitted token among the
candidates the tree pre-drafted at that position (so one run with a wide fan-out answers "would it
have hit with fan-out F?" for every smaller F). For every finished round: whether its speculation
was a hit, where a miss's came from, and the tokens the round produced. Plus the time the drafter
spent per tree and per response with misses, and the engine's verification time per round.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from saguaro.ssd.protocol import Drafter, LocalDrafter


@dataclass
class Lookup:
    position: int  # k of the outcome (k accepted, then one token of the target's)
    rank: int | None  # rank of that token among the tree's candidates at k; None: not among them (or unknown)
    hit: bool


@dataclass
class Round:
    hit: bool | None  # None: the first round after prefill, which looks nothing up
    source: str  # "tree" on a hit, else the fallback that drafted the speculation
    tokens: int  # accepted draft tokens + the target's one


def _mean(values) -> float | None:
    values = list(values)
    return statistics.fmean(values) if values else None


class RoundRecorder:
    """Install with `RoundRecorder(engine)`: it takes the place of `engine.drafter` (a Drafter itself)
    and forwards every call."""

    def __init__(self, engine):
        self.engine = engine
        self.inner: Drafter = engine.drafter
        engine.drafter = self
        self.base = dict(engine.totals)  # engine totals before recording (warm-up excluded)
        self.row_ids: list[int] = []
        self.current: list[tuple[bool | None, str] | None] = []  # per row: the speculation being verified
        self.lookups: list[Lookup] = []
        self.rounds: list[Round] = []
        self.tree_times: list[float] = []  # not `tree_s`: the engine reads that from the drafter
        self.miss_respond_times: list[float] = []  # responses that had to draft for a miss

    @property
    def tree_s(self) -> float:
        return self.inner.tree_s

    @property
    def fallback_s(self) -> float:
        return self.inner.fallback_s

    def finish_tree(self) -> None:
        self.inner.finish_tree()

    def close(self) -> None:
        self.inner.close()

    def prefill(self, seq_ids, prompts, params, seeds) -> None:
        self.inner.prefill(seq_ids, prompts, params, seeds)
        self.row_ids += list(seq_ids)
        self.current += [None] * len(seq_ids)

    def _ranks(self, outcomes) -> list[int | None]:
        rows = self.inner.drafter.rows if isinstance(self.inner, LocalDrafter) else None  # in-process only
        ranks = []
        for i, outcome in enumerate(outcomes):
            if outcome is None or rows is None:
                ranks.append(None)
                continue
            k, token = outcome
            candidates = [t for (pos, t) in rows[i].branches if pos == k]  # in the tree's top-F order
            ranks.append(candidates.index(token) if token in candidates else None)
        return ranks

    def _close_round(self, row: int, outcome) -> None:
        if outcome is not None and self.current[row] is not None:
            hit, source = self.current[row]
            self.rounds.append(Round(hit, source, outcome[0] + 1))

    def respond(self, outcomes, new_tokens, *policy):
        ranks = self._ranks(outcomes)
        for i, outcome in enumerate(outcomes):
            self._close_round(i, outcome)
        t = time.perf_counter()
        specs = self.inner.respond(outcomes, new_tokens, *policy)
        elapsed = time.perf_counter() - t
        missed = False
        for i, (outcome, spec, rank) in enumerate(zip(outcomes, specs, ranks)):
            if outcome is None:
                self.current[i] = (None, spec.source)
                continue
            self.lookups.append(Lookup(outcome[0], rank, spec.hit))
            self.current[i] = (spec.hit, spec.source)
            missed |= not spec.hit
        if missed:
            self.miss_respond_times.append(elapsed)
        return specs

    def build_tree(self) -> None:
        t = time.perf_counter()
        self.inner.build_tree()
        self.tree_times.append(time.perf_counter() - t)

    def retire(self, keep: list[int]) -> None:
        kept = set(keep)
        for i, sid in enumerate(self.row_ids):  # a finished row's last round ended with the engine's outcome
            if i not in kept:
                self._close_round(i, self.engine.outcome.get(sid))
        self.row_ids = [self.row_ids[i] for i in keep]
        self.current = [self.current[i] for i in keep]
        self.inner.retire(keep)

    # ------------------------------------------------------------------ summaries
    def verify_s_per_round(self) -> float | None:
        rounds = self.engine.totals["rounds"] - self.base["rounds"]
        return (self.engine.totals["verify_s"] - self.base["verify_s"]) / rounds if rounds else None

    def summary(self) -> dict:
        """Measured quantities of the speedup model (times are per round, in seconds and in verifications)."""
        hits = [lk.hit for lk in self.lookups]
        verify = self.verify_s_per_round()
        tree, miss = _mean(self.tree_times), _mean(self.miss_respond_times)
        return {
            "lookups": len(hits),
            "p_hit": sum(hits) / len(hits) if hits else None,
            "tokens_hit": _mean(r.tokens for r in self.rounds if r.hit is True),
            "tokens_miss": _mean(r.tokens for r in self.rounds if r.hit is False),
            "rounds_hit": sum(r.hit is True for r in self.rounds),
            "rounds_miss": sum(r.hit is False for r in self.rounds),
            "verify_s": verify,
            "tree_s": tree,
            "miss_respond_s": miss,
            "t_primary": tree / verify if tree is not None and verify else None,
            "t_backup": miss / verify if miss is not None and verify else None,
        }
