"""A request's state as it moves through the engine."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from saguaro.sampling import SamplingParams, TokenLogprob

_ids = itertools.count()


@dataclass
class RoundStats:
    """What speculative rounds did for one sequence (all zero in AR mode)."""

    rounds: int = 0
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens accepted
    cache_hits: int = 0
    cache_lookups: int = 0
    accepted_on_hit: int = 0  # draft tokens accepted in rounds whose speculation was a cache hit
    accepted_on_miss: int = 0
    lookup_rounds: int = 0  # rounds prompt lookup proposed for (SSD: ahead of its cache; not cache lookups)
    accepted_on_lookup: int = 0
    draft_s: float = 0.0  # time the engine waited for drafts, in rounds this sequence took part in
    verify_s: float = 0.0
    draft_busy_s: float = 0.0  # SSD: time the drafter worked for those rounds (tree + fallback)
    ar_rounds: int = 0  # mode "auto": rounds that ran plain decoding instead of speculation
    auto_reason: str | None = None  # mode "auto": why its last round ran the mode it did
    speculative_mode: str = "ssd"  # mode "auto": the speculative mode weighed against AR


@dataclass(eq=False)  # a request is itself: identity, not field-by-field equality
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS or stop string), "length", or "abort"
    generator: torch.Generator | None = None
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    stats: RoundStats = field(default_factory=RoundStats)
    # Set by the face that holds the tokenizer when the request has stop strings: called with the
    # output after each round, it returns None, or how many output tokens to keep because a stop
    # string appeared (serve/detokenizer.py StopStrings). The engine needs no tokenizer.
    stop_check: Callable[[list[int]], int | None] | None = None
    # one per output token when params.logprobs is set: the target's, under the processed distribution
    logprobs: list[TokenLogprob] | None = None

    def __post_init__(self):
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)
        if self.params.logprobs is not None and self.logprobs is None:
            self.logprobs = []

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def remaining(self) -> int:
        return self.params.max_tokens - len(self.output_ids)

    def append(self, tokens: list[int], stop_ids: set[int], logprobs: list[TokenLogprob] | None = None) -> list[int]:
        """Add tokens (and their log-probs), stopping at EOS or max_tokens; return the tokens actually kept."""
        kept = []
        for t in tokens:
            kept.append(t)
            if t in stop_ids and not self.params.ignore_eos:
                self.finish_reason = "stop"
                break
            if len(self.output_ids) + len(kept) >= self.params.max_tokens:
                self.finish_reason = "length"
                break
        self.output_ids.extend(kept)
        if self.logprobs is not None and logprobs is not None:
            self.logprobs.extend(logprobs[: len(kept)])
        now = time.perf_counter()
        if self.first_token_at is None and kept:
            self.first_token_at = now
        if self.finished:
            self.finished_at = now
        return kept

    def check_stop_strings(self) -> bool:
        """Whether a stop string ended the output just now; then only the tokens before it remain."""
        if self.stop_check is None or self.finish_reason == "abort":
            return False
        keep = self.stop_check(self.output_ids)
        if keep is None:
            return False
        del self.output_ids[keep:]  # speculative rounds may have added tokens past the stop string
        if self.logprobs is not None:
            del self.logprobs[keep:]
        self.finish_reason = "stop"
        self.finished_at = time.perf_counter()
        return True

    def metrics(self) -> dict:
        end = self.finished_at or time.perf_counter()
        elapsed = end - self.started
        n = len(self.output_ids)
        decode_time = end - (self.first_token_at or end)
        s = self.stats
        out = {
            "prompt_tokens": len(self.prompt_ids),
            "generated_tokens": n,
            "time_s": elapsed,
            "ttft_s": (self.first_token_at or end) - self.started,
            "tokens_per_s": n / elapsed if elapsed > 0 else 0.0,
            "decode_ms_per_token": 1000 * decode_time / (n - 1) if n > 1 else None,
        }
        if s.rounds:
            out.update(
                rounds=s.rounds,
                drafted_tokens=s.drafted,
                accepted_tokens=s.accepted,
                mean_accepted=s.accepted / s.rounds,
                acceptance_rate=s.accepted / s.drafted if s.drafted else 0.0,
                tokens_per_round=(n - 1) / s.rounds,  # the first token comes from prefill
                draft_s=s.draft_s,
                verify_s=s.verify_s,
            )
        if s.cache_lookups:
            misses = s.cache_lookups - s.cache_hits
            out.update(
                cache_hit_rate=s.cache_hits / s.cache_lookups,
                mean_accepted_on_hit=s.accepted_on_hit / s.cache_hits if s.cache_hits else None,
                mean_accepted_on_miss=s.accepted_on_miss / misses if misses else None,
            )
        if s.lookup_rounds:
            out.update(lookup_rounds=s.lookup_rounds, mean_accepted_on_lookup=s.accepted_on_lookup / s.lookup_rounds)
        if s.auto_reason is not None:
            spec = s.speculative_mode
            out.update(mode=f"{spec}+ar" if s.rounds and s.ar_rounds else "ar" if s.ar_rounds else spec,
                       ar_rounds=s.ar_rounds, auto_reason=s.auto_reason)
        if s.draft_busy_s > 0:  # the share of the drafter's work the target's verification hid
            out.update(
                draft_busy_s=s.draft_busy_s,
                draft_idle_s=max(0.0, s.verify_s - s.draft_busy_s),
                draft_hidden_fraction=min(1.0, max(0.0, 1.0 - s.draft_s / s.draft_busy_s)),
            )
        return out
