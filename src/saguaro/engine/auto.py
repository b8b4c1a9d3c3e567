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

import math
from dataclasses import dataclass, field
from typing import Protocol

from saguaro.engine.mode_clocks import STALL_FACTOR, ModeClock, PairedRatio

__all__ = ["STALL_FACTOR", "MeasuredRounds", "ModeClock", "RoundChoice", "RoundRule", "StaticRule", "choose_round"]


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


@dataclass
class MeasuredRounds:
    """At one row: the faster mode per band as measured; `warmup` timed tokens of each first (speculation
    first; in a band with a prior, the prior's mode, and the other's after `explore_every` rounds), then
    `explore_tokens` of the slower every `explore_every` rounds, stretched by the square of how much
    slower it measured (re-measuring a mode at 0.6x costs more than one at 0.95x, and is less likely to
    have turned) and doubled after each re-measurement that changed nothing, up to `max_backoff` times
    (a long-running server then pays ever less for a mode that keeps losing; a change of the faster mode
    starts the doubling over). Batches run AR.

    The modes are compared side by side (mode_clocks.PairedRatio): each warm-up and re-measurement
    against the other mode's rounds just across the switch, over equal tokens. Speculation takes over
    from AR only when even the slow end of that comparison (one standard error) has it `switch_margin`
    faster; AR takes over from speculation at `switch_margin` of the estimate. Before any comparison (a
    remembered clock), the two clocks decide, with the wider `speculation_margin`.

    The first round after a switch is run but not timed: it pays for the switch (threads re-pinned,
    OpenMP's team resized, the draft worker still finishing a tree on the core AR now wants, the
    drafter resynced), which would make whichever mode is explored look slower than it runs."""

    # A speculative round yields 1 to K+1 tokens, and how many depends on the text: its speed moves from
    # prompt to prompt where AR's does not. A few rounds decided nothing (measured: auto chose AR after
    # 8 SD rounds of one hard prompt, at 1.00-1.02x AR where SD ran at 1.14-1.20x). Timing the loser
    # longer is cheap (every mode measured within 0.83-1.2x AR here); choosing wrong is not.
    # So the loser keeps being timed on the same prompts as the winner, in blocks every ~64 rounds.
    warmup: int = 16  # timed tokens of each mode before choosing (after the round that settles it)
    explore_every: int = 64
    explore_tokens: int = 12  # timed tokens of a re-measurement (after the round that settles it)
    max_backoff: int = 8  # each re-measurement that leaves the faster mode unchanged doubles the wait, to this
    # the other mode must measure this much faster to take over: rounds on a busy 2-core VM move +-10%,
    # and near a tie, flapping paid a settling round and a re-measurement each time for nothing
    switch_margin: float = 0.08
    # ...and, from two clocks timed apart (a memory, before any side-by-side comparison), speculation must
    # measure this much faster to take over from AR: such clocks drift with a shared VM's speed, and
    # favoured sampled SD by 5-20% where it ran at 0.93-1.00x AR end to end (T = 1, 2026-12-01,
    # docs/results/dec01/); with the shipped draft sampled SD never measured more than 1.07x AR.
    speculation_margin: float = 0.25
    # the standard error of the side-by-side log ratio taken below 3 pairs (pairs of 12 sampled tokens read
    # SD at 0.85-1.15x AR in one run at T = 0.7 where it ran at ~0.98x end to end)
    unknown_spread: float = 0.2
    speculative: str = "ssd"  # the mode weighed against AR: "ssd", or "sd" for an SD engine
    # per band, the mode that runs until the other measures its margin faster (what recorded runs found
    # faster there); a band without one goes to whichever measures faster after the warm-up
    prior: dict[str, str] = field(default_factory=dict)
    clocks: dict[tuple[str, str], ModeClock] = field(default_factory=dict)
    paired: dict[str, PairedRatio] = field(default_factory=dict)
    _since_explore: dict[str, int] = field(default_factory=dict)
    _last_mode: dict[str, str] = field(default_factory=dict)
    _best: dict[str, str] = field(default_factory=dict)
    _explorations: dict[str, int] = field(default_factory=dict)  # since the faster mode last changed
    _exploring: dict[str, str] = field(default_factory=dict)  # band -> the mode being re-measured
    _block_tokens: dict[str, int] = field(default_factory=dict)  # its timed tokens so far
    _speed_text: dict[str, tuple] = field(default_factory=dict)  # band -> (when, text): a reason's numbers

    def __call__(self, batch: int, sampled_rows: int) -> RoundChoice:
        if batch > 1:
            return RoundChoice("ar", f"batch {batch} > 1: speculation measured below batched AR")
        band = "sampled" if sampled_rows else "greedy"
        spec = self.speculative
        prior = self.prior.get(band)
        order = (spec, "ar") if prior is None else (prior, "ar" if prior == spec else spec)
        for mode in order:
            clock = self._clock(band, mode)
            if clock.tokens >= self.warmup:
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
            return RoundChoice(mode, f"{band}: measuring {mode} ({clock.tokens}/{self.warmup} tokens)")
        exploring = self._exploring.get(band)
        if exploring is not None:
            if self._block_tokens.get(band, 0) < self.explore_tokens:
                return RoundChoice(exploring, f"{band}: re-measuring {exploring} ({self._speeds(band)})")
            del self._exploring[band]
            self._explorations[band] = self._explorations.get(band, 0) + 1
            self._since_explore[band] = 0
            self._pairs(band).close()  # the block against the rounds before it, before deciding
        elif band not in self._best:
            self._pairs(band).close()  # the two warm-ups, side by side
        best, slower = self._faster(band)
        other = "ar" if best == spec else spec
        if self._best.get(band) != best:
            self._best[band], self._explorations[band] = best, 0
        since = self._since_explore.get(band, 0)
        backoff = min(2 ** self._explorations.get(band, 0), self.max_backoff)
        every = round(self.explore_every * slower ** 2 * backoff)
        if other == "ar" and self._clock(band, "ar").memory is not None:
            # AR remembered as the slower: checked on this process's rounds soon, since a wrong memory
            # here would run speculation slower than plain decoding. Speculation remembered as the slower
            # keeps the usual wait: a fresh server's first short requests then do not pay to re-time it.
            every = self.explore_every
        if since >= every:
            self._exploring[band], self._block_tokens[band] = other, 0
            return RoundChoice(other, f"{band}: re-measuring {other} ({self._speeds(band)})")
        self._since_explore[band] = since + 1
        return RoundChoice(best, f"{band}: {best} measured faster ({self._speeds(band)})")

    def _faster(self, band: str) -> tuple[str, float]:
        """The mode to run in `band` and how many times slower the other measured."""
        spec = self.speculative
        incumbent = self._best.get(band) or self.prior.get(band)
        estimate = self._pairs(band).estimate()
        if estimate is not None:
            ratio, spread, _ = estimate  # speculation's seconds per token over AR's, side by side
            if incumbent == spec:
                best = "ar" if ratio > 1 + self.switch_margin else spec
            else:  # AR runs (or nothing yet): speculation only where it is faster at the slow end
                spread = self.unknown_spread if spread is None else spread
                best = spec if ratio * math.exp(spread) * (1 + self.switch_margin) < 1 else "ar"
            return best, max(ratio, 1 / ratio)
        spec_s, ar_s = self._clock(band, spec).per_token_s, self._clock(band, "ar").per_token_s
        best = spec if spec_s <= ar_s else "ar"
        if incumbent is not None and best != incumbent:  # a near tie keeps the mode running (no flapping)
            held, challenger = (spec_s, ar_s) if incumbent == spec else (ar_s, spec_s)
            margin = self.switch_margin if incumbent == spec else self.speculation_margin
            if challenger * (1 + margin) > held:
                best = incumbent
        return best, max(spec_s, ar_s) / min(spec_s, ar_s)

    def _speeds(self, band: str) -> str:
        """The numbers behind a choice, for its reason: written again when a pair comes in or every 16
        rounds, not every round (a round of AR takes ~5 ms; composing this each time took 0.1 ms)."""
        spec = self.speculative
        pairs = self._pairs(band)
        when = (len(pairs.pairs), pairs.pairs[-1] if pairs.pairs else None,
                (self._clock(band, spec).rounds + self._clock(band, "ar").rounds) // 16)
        cached = self._speed_text.get(band)
        if cached is not None and cached[0] == when:
            return cached[1]
        text = (f"{spec} {self._clock(band, spec).tokens_per_s:.1f} vs ar "
                f"{self._clock(band, 'ar').tokens_per_s:.1f} tok/s")
        estimate = self._pairs(band).estimate()
        if estimate is not None:
            ratio, spread, pairs = estimate
            text += f"; side by side {spec} {1 / ratio:.2f}x ar over {pairs} pair(s)"
            if spread is not None:
                text += f" +-{100 * spread:.0f}%"
        self._speed_text[band] = (when, text)
        return text

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
                clock.recall(float(seconds), weight=max(1, min(self.warmup, self.explore_tokens)))
                clock.rounds, clock.tokens = max(clock.rounds, self.warmup), max(clock.tokens, self.warmup)

    def observe(self, choice: RoundChoice, batch: int, sampled_rows: int, seconds: float, tokens: int) -> None:
        if batch != 1:
            return
        band = "sampled" if sampled_rows else "greedy"
        settled = self._last_mode.get(band) == choice.mode
        self._last_mode[band] = choice.mode
        if not settled:
            return
        clock = self._clock(band, choice.mode)
        stalled = len(clock.samples) >= 4 and seconds > PAIR_STALL_FACTOR * clock.typical_round_s
        clock.add(seconds, tokens)
        if not stalled:
            self._pairs(band).add(choice.mode, seconds, tokens)
        if self._exploring.get(band) == choice.mode:
            self._block_tokens[band] = self._block_tokens.get(band, 0) + max(tokens, 1)

    def _clock(self, band: str, mode: str) -> ModeClock:
        return self.clocks.setdefault((band, mode), ModeClock())

    def _pairs(self, band: str) -> PairedRatio:
        return self.paired.setdefault(band, PairedRatio(self.speculative))


# A round this many times the mode's median round is a stall (a preempted thread), kept out of the side-by-
# side comparison; wider than STALL_FACTOR, since a speculative round verifying K+1 tokens legitimately
# takes about twice one that drafted nothing.
PAIR_STALL_FACTOR = 4.0
