"""What `mode="auto"` runs for one decode round: speculation (SD on a CPU, SSD where the draft has
hardware of its own: llm.auto_mode) or plain decoding (AR).

Every mode verifies against the same target distribution, so this choice moves speed, never the
output distribution. Two rules:

- `choose_round`, the static rule the recorded eager runs supported (2-core AMD EPYC, held-out chat
  prompts): SSD only for one greedy row; sampled rows and batches run AR.
- `MeasuredRounds`, the default: for one row, per band (greedy or sampled), the mode whose measured
  seconds per emitted token are lower, each tried for a few rounds first and the loser re-tried now
  and then so its estimate stays honest. It measures what the rule cannot know in advance: a
  compiled one-token step made AR 2.5x faster while verification of K+1 tokens gained far less, and
  a better draft moves the balance back. Batches keep AR: under 8 concurrent server clients SSD gave
  under half of plain batched decoding (verifying K+1 tokens per row turns compute-bound).

When AR runs, the target takes every core and an SSD draft worker idles; speculation resumes when the
rule says so (SSD's drafter catches up on the tokens it missed with one just-in-time draft, a cost the
next SSD round's time includes; SD's draft feeds them in its next proposal).
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class RoundChoice:
    mode: str  # the speculative mode ("ssd" or "sd") or "ar"
    reason: str  # why, for metrics["auto_reason"]


class RoundRule(Protocol):
    def __call__(self, batch: int, sampled_rows: int) -> RoundChoice: ...

    def observe(self, choice: RoundChoice, batch: int, sampled_rows: int, seconds: float, tokens: int) -> None:
        """The round just run under `choice` took `seconds` and emitted `tokens` tokens in all."""


class StaticRule:
    def __call__(self, batch: int, sampled_rows: int) -> RoundChoice:
        return choose_round(batch, sampled_rows)

    def observe(self, choice, batch, sampled_rows, seconds, tokens) -> None:
        pass


def choose_round(batch: int, sampled_rows: int) -> RoundChoice:
    """The mode of the next round for a running batch of `batch` rows, `sampled_rows` of them at T > 0."""
    if sampled_rows:
        return RoundChoice("ar", f"{sampled_rows} sampled row(s): SSD measured below AR at T > 0")
    if batch > 1:
        return RoundChoice("ar", f"batch {batch} > 1: SSD measured below batched AR")
    return RoundChoice("ssd", "one greedy row: SSD measured above AR")


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
    memory: tuple[float, int] | None = None  # an earlier process's (seconds, tokens), until own rounds replace it
    _per_token: float | None = field(default=None, repr=False)  # computed once per change (asked per round)

    def add(self, seconds: float, tokens: int) -> None:
        self.samples.append((seconds, max(tokens, 1)))
        if len(self.samples) > self.window:
            self.samples.popleft()
        if self.memory is not None and len(self.samples) >= self.memory[1]:
            self.memory = None
        self.rounds += 1
        self._per_token = None

    def recall(self, seconds_per_token: float, weight: int = 1) -> None:
        """Start from an earlier process's measurement, counted as `weight` rounds of one token until as
        many own rounds replace it: one own round of a speculative mode (1 to K+1 tokens) is too noisy."""
        self.samples.clear()
        self.memory = (seconds_per_token * weight, weight)
        self._per_token = None

    @property
    def per_token_s(self) -> float | None:
        if self._per_token is None and (self.samples or self.memory):
            kept = [self.memory] if self.memory else []
            if self.samples:
                limit = STALL_FACTOR * statistics.median(sec for sec, _ in self.samples)
                kept += [(sec, n) for sec, n in self.samples if sec <= limit]
            self._per_token = sum(sec for sec, _ in kept) / sum(n for _, n in kept)
        return self._per_token

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.per_token_s if self.per_token_s else 0.0


@dataclass
class MeasuredRounds:
    """At one row: the faster mode per band as measured; `warmup` rounds of each first (SSD first; in a
    band with a prior, the prior's mode, and the other's after `explore_every` rounds),
    then `explore_rounds` of the slower every `explore_every` rounds, stretched by the square of how
    much slower it measured (re-measuring a mode at 0.6x costs more than one at 0.95x, and is less
    likely to have turned) and doubled after each re-measurement that changed nothing, up to
    `max_backoff` times (a long-running server then pays ever less for a mode that keeps losing; a
    change of the faster mode starts the doubling over). Batches run AR.

    The first round after a switch is run but not timed: it pays for the switch (threads re-pinned,
    OpenMP's team resized, the draft worker still finishing a tree on the core AR now wants, the
    drafter resynced), which would make whichever mode is explored look slower than it runs."""

    # A speculative round yields 1 to K+1 tokens, and how many depends on the text: its speed moves from
    # prompt to prompt where AR's does not. A few rounds decided nothing (measured: auto chose AR after
    # 8 SD rounds of one hard prompt, at 1.00-1.02x AR where SD ran at 1.14-1.20x). Timing the loser
    # longer is cheap (every mode measured within 0.83-1.2x AR here); choosing wrong is not.
    # So the loser keeps being timed on the same prompts as the winner, in blocks of 8 every ~64 rounds.
    warmup: int = 16  # timed rounds of each mode before choosing (after the round that settles it)
    explore_every: int = 64
    explore_rounds: int = 9  # the first settles, the others are timed
    max_backoff: int = 8  # each re-measurement that leaves the faster mode unchanged doubles the wait, to this
    # the other mode must measure this much faster to take over: rounds on a busy 2-core VM move +-10%,
    # and near a tie, flapping paid a settling round and a re-measurement each time for nothing
    switch_margin: float = 0.08
    # ...and speculation must measure this much faster to take over from AR where AR runs: the clocks of
    # rounds timed apart drift with a shared VM's speed, and favoured sampled SD by 5-20% where it ran at
    # 0.93-1.00x AR end to end (T = 1, 2026-12-01, docs/results/dec01/); with the shipped draft sampled SD never
    # measured more than 1.07x AR. A draft good enough to pay at T > 0 clears it; AR takes over from
    # speculation at switch_margin, so the rule leans towards never running slower than plain decoding.
    speculation_margin: float = 0.25
    speculative: str = "ssd"  # the mode weighed against AR: "ssd", or "sd" for an SD engine
    # per band, the mode that runs until the other measures its margin faster (what recorded runs found
    # faster there); a band without one goes to whichever measures faster after the warm-up
    prior: dict[str, str] = field(default_factory=dict)
    clocks: dict[tuple[str, str], ModeClock] = field(default_factory=dict)
    _since_explore: dict[str, int] = field(default_factory=dict)
    _last_mode: dict[str, str] = field(default_factory=dict)
    _best: dict[str, str] = field(default_factory=dict)
    _explorations: dict[str, int] = field(default_factory=dict)  # since the faster mode last changed

    def __call__(self, batch: int, sampled_rows: int) -> RoundChoice:
        if batch > 1:
            return RoundChoice("ar", f"batch {batch} > 1: speculation measured below batched AR")
        band = "sampled" if sampled_rows else "greedy"
        spec = self.speculative
        ssd, ar = self._clock(band, spec), self._clock(band, "ar")
        prior = self.prior.get(band)
        order = (spec, "ar") if prior is None else (prior, "ar" if prior == spec else spec)
        for mode in order:
            clock = self._clock(band, mode)
            if clock.rounds >= self.warmup:
                continue
            since = self._since_explore.get(band, 0)
            deferred = prior is not None and mode != prior and self._last_mode.get(band) != mode
            if deferred and since < self.explore_every:
                # the prior's mode runs first; the other is first timed where it would be re-measured
                # (a fresh server's first requests run what recorded runs found faster)
                self._since_explore[band] = since + 1
                return RoundChoice(prior, f"{band}: {prior} by prior ({mode} timed after "
                                          f"{self.explore_every - since} rounds)")
            self._since_explore[band] = 0  # the exploration that follows starts counting after this
            return RoundChoice(mode, f"{band}: measuring {mode} ({clock.rounds + 1}/{self.warmup})")
        best = spec if ssd.per_token_s <= ar.per_token_s else "ar"
        incumbent = self._best.get(band) or self.prior.get(band)
        if incumbent is not None and best != incumbent:  # a near tie keeps the mode running (no flapping)
            held, challenger = (ssd, ar) if incumbent == spec else (ar, ssd)
            margin = self.switch_margin if incumbent == spec else self.speculation_margin
            if challenger.per_token_s * (1 + margin) > held.per_token_s:
                best = incumbent
        other = "ar" if best == spec else spec
        speeds = f"{spec} {ssd.tokens_per_s:.1f} vs ar {ar.tokens_per_s:.1f} tok/s"
        if self._best.get(band) != best:
            self._best[band], self._explorations[band] = best, 0
        since = self._since_explore.get(band, 0)
        slower = max(ssd.per_token_s, ar.per_token_s) / min(ssd.per_token_s, ar.per_token_s)
        backoff = min(2 ** self._explorations.get(band, 0), self.max_backoff)
        every = round(self.explore_every * slower ** 2 * backoff)
        if other == "ar" and self._clock(band, "ar").memory is not None:
            # AR remembered as the slower: checked on this process's rounds soon, since a wrong memory
            # here would run speculation slower than plain decoding. Speculation remembered as the slower
            # keeps the usual wait: a fresh server's first short requests then do not pay to re-time it.
            every = self.explore_every
        if since >= every:
            if since >= every + self.explore_rounds - 1:
                self._since_explore[band] = -1
                self._explorations[band] = self._explorations.get(band, 0) + 1
            else:
                self._since_explore[band] = since + 1
            return RoundChoice(other, f"{band}: re-measuring {other} ({speeds})")
        self._since_explore[band] = since + 1
        return RoundChoice(best, f"{band}: {best} measured faster ({speeds})")

    def remembered(self) -> dict[str, float]:
        """Each measured clock's seconds per token, keyed "band/mode" (what `auto_memory` keeps)."""
        return {f"{band}/{mode}": c.per_token_s for (band, mode), c in self.clocks.items() if c.per_token_s}

    def recall(self, clocks: dict[str, float]) -> None:
        """Start from clocks an earlier process measured, so a band whose two modes are both remembered
        chooses at once. One re-measurement's timed rounds replace a remembered clock, and AR, where it
        is remembered as the slower, is re-measured after `explore_every` rounds however much slower: a
        memory measured on a busier machine had auto run SD at T = 1 where AR measured 10% faster
        (sampled AR remembered at 9.3 ms a token, measured at 5.1), and it held for hundreds of rounds."""
        for name, seconds in clocks.items():
            band, _, mode = name.partition("/")
            if band in ("greedy", "sampled") and mode in (self.speculative, "ar") and seconds and seconds > 0:
                clock = self._clock(band, mode)
                clock.recall(float(seconds), weight=max(1, min(self.warmup, self.explore_rounds - 1)))
                clock.rounds = max(clock.rounds, self.warmup)

    def observe(self, choice: RoundChoice, batch: int, sampled_rows: int, seconds: float, tokens: int) -> None:
        if batch != 1:
            return
        band = "sampled" if sampled_rows else "greedy"
        settled = self._last_mode.get(band) == choice.mode
        self._last_mode[band] = choice.mode
        if settled:
            self._clock(band, choice.mode).add(seconds, tokens)

    def _clock(self, band: str, mode: str) -> ModeClock:
        return self.clocks.setdefault((band, mode), ModeClock())
