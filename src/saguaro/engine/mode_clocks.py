"""What mode auto measures: each mode's seconds per emitted token, and speculation against AR side by side.

Two measurements, because a round's time moves for two reasons the rule must not confuse:

- `ModeClock`, one mode's recent rounds: what a band chooses from before any side-by-side comparison
  exists (a remembered clock, a warm-up), and what auto remembers across processes.
- `PairedRatio`, speculation's seconds per token over AR's, each run of one mode compared with the
  rounds of the other just across the switch. A shared VM's speed drifts +-15% over tens of seconds
  (2-core EPYC, 2026-12-01), so two clocks filled minutes apart differ by that much for no reason of
  the modes'; two runs side by side share the machine's speed of that moment.

Runs are compared over equal numbers of tokens, not rounds: a speculative round covers 1 to K+1 tokens,
so a block of N speculative rounds covers more of the easy text than of the hard, and reads speculation
faster than it runs (`benchmarks/block_bias.py`, synthetic text: blocks of rounds ~7% fast, blocks of
tokens 1-1.6%).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

STALL_FACTOR = 2.0  # a round this many times slower than the window's median round is left out


@dataclass
class ModeClock:
    """Seconds per emitted token of one mode in one band over its last `window` rounds: their time
    over their tokens, leaving out rounds that stalled (a page fault, a thread preempted on a busy
    machine: over STALL_FACTOR x the median round), so one such round does not decide for 60.

    Time over tokens, not a median of per-round rates: a speculative round yields 1 to K+1 tokens,
    and when most rounds yield one the median rate is the slow one, though the long rounds pay for
    them (measured: auto chose AR at 0.97x where SD ran at 1.05x)."""

    window: int = 128
    samples: deque = field(default_factory=deque)  # (seconds, tokens) of each round
    rounds: int = 0
    tokens: int = 0  # emitted by all timed rounds so far
    memory: tuple[float, int] | None = None  # an earlier process's (seconds, tokens), until own rounds replace it
    _per_token: float | None = field(default=None, repr=False)  # computed once per change (asked per round)
    _typical: tuple[int, float] | None = field(default=None, repr=False)  # (rounds when taken, median round s)

    def add(self, seconds: float, tokens: int) -> None:
        self.samples.append((seconds, max(tokens, 1)))
        if len(self.samples) > self.window:
            self.samples.popleft()
        if self.memory is not None and len(self.samples) >= self.memory[1]:
            self.memory = None
        self.rounds += 1
        self.tokens += max(tokens, 1)
        self._per_token = None

    def recall(self, seconds_per_token: float, weight: int = 1) -> None:
        """Start from an earlier process's measurement, counted as `weight` rounds of one token until as
        many own rounds replace it: one own round of a speculative mode (1 to K+1 tokens) is too noisy."""
        self.samples.clear()
        self.memory = (seconds_per_token * weight, weight)
        self._per_token = self._typical = None

    @property
    def per_token_s(self) -> float | None:
        if self._per_token is None and (self.samples or self.memory):
            kept = [self.memory] if self.memory else []
            if self.samples:
                limit = STALL_FACTOR * self.typical_round_s
                kept += [(sec, n) for sec, n in self.samples if sec <= limit]
            self._per_token = sum(sec for sec, _ in kept) / sum(n for _, n in kept)
        return self._per_token

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.per_token_s if self.per_token_s else 0.0

    @property
    def typical_round_s(self) -> float | None:
        """The median round of the window, taken again every 16 rounds (asked every round)."""
        if not self.samples:
            return None
        if self._typical is None or self.rounds - self._typical[0] >= 16:
            self._typical = (self.rounds, statistics.median(sec for sec, _ in self.samples))
        return self._typical[1]


@dataclass
class Run:
    """Consecutive timed rounds of one mode: the first rounds and the last, each covering up to `cap` tokens."""

    mode: str
    cap: int
    head: list = field(default_factory=list)  # (seconds, tokens)
    tail: deque = field(default_factory=deque)
    head_tokens: int = 0
    tail_tokens: int = 0
    paired: bool = False  # compared with the run before it already

    def add(self, seconds: float, tokens: int) -> None:
        if self.head_tokens < self.cap:
            self.head.append((seconds, tokens))
            self.head_tokens += tokens
        self.tail.append((seconds, tokens))
        self.tail_tokens += tokens
        while self.tail_tokens - self.tail[0][1] >= self.cap:
            self.tail_tokens -= self.tail.popleft()[1]


def _covering(rounds, tokens: int) -> tuple[float, int]:
    """(seconds, tokens) of the fewest leading `rounds` that cover `tokens` tokens."""
    sec = got = 0
    for s, n in rounds:
        if got >= tokens:
            break
        sec, got = sec + s, got + n
    return sec, got


@dataclass
class PairedRatio:
    """Speculation's seconds per token over AR's, from runs of the two modes compared across each switch:
    the last tokens of the run that ended against the first tokens of the one after it, over the same
    number of tokens (at most `cap`, at least `least`). AR is the yardstick: each pair's speculative
    time is counted in units of AR's seconds per token of that moment, so drift cancels within a pair."""

    speculative: str
    cap: int = 16
    least: int = 4
    window: int = 16  # pairs kept (a re-measurement gives two: the switch into it and the one out)
    pairs: deque = field(default_factory=deque)  # (speculative seconds, tokens, AR seconds, tokens)
    _runs: deque = field(default_factory=lambda: deque(maxlen=2))
    _estimate: tuple | None = field(default=None, repr=False)  # computed once per new pair (asked per round)

    def add(self, mode: str, seconds: float, tokens: int) -> None:
        """A timed round; a round of the other mode than the last one's starts a run."""
        if not self._runs or self._runs[-1].mode != mode:
            self.close()
            self._runs.append(Run(mode, self.cap))
        self._runs[-1].add(seconds, max(tokens, 1))

    def close(self) -> None:
        """Pair the run before the current one with it, across the switch between them (once: a block
        that ends is paired at once, the run after a block when the next switch comes)."""
        if len(self._runs) < 2 or self._runs[1].paired:
            return
        before, after = self._runs
        n = min(before.tail_tokens, after.head_tokens, self.cap)
        if n < self.least:
            return
        after.paired = True
        b = _covering(reversed(before.tail), n)
        a = _covering(after.head, n)
        spec, ar = (b, a) if before.mode == self.speculative else (a, b)
        self.pairs.append((*spec, *ar))
        if len(self.pairs) > self.window:
            self.pairs.popleft()
        self._estimate = None

    def estimate(self) -> tuple[float, float, int] | None:
        """(ratio, spread, pairs): speculation's seconds per token over AR's pooled over the pairs (< 1:
        speculation faster), the standard error of its log (None below 3 pairs), and the pairs; None
        without a pair."""
        pairs = self.pairs
        if not pairs:
            return None
        if self._estimate is None:
            ratio = sum(s * at / a for s, _, a, at in pairs) / sum(st for _, st, _, _ in pairs)
            spread = None
            if len(pairs) >= 3:
                logs = [math.log((s / st) / (a / at)) for s, st, a, at in pairs]
                mean = sum(logs) / len(logs)
                sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (len(logs) - 1))
                # consecutive pairs share a run (a re-measurement is paired on both sides): half as many
                # independent ones
                spread = sd / math.sqrt(len(pairs) / 2)
            self._estimate = (ratio, spread, len(pairs))
        return self._estimate
