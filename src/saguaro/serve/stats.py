"""Server-wide counters behind /metrics: written by the engine thread, read by request handlers."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from saguaro.engine.sequence import Sequence


@dataclass
class ServerStats:
    requests_served: int = 0  # finished with "stop" or "length"
    requests_aborted: int = 0  # their client left
    requests_failed: int = 0  # the engine or shutdown failed them
    prompt_tokens: int = 0
    tokens_generated: int = 0
    rounds: int = 0  # engine steps that ran
    busy_s: float = 0.0  # time spent inside engine steps
    max_seqs_per_round: int = 0
    seq_rounds: int = 0  # sum over rounds of the sequences in each (mean = seq_rounds / rounds)
    drafted: int = 0
    accepted: int = 0
    cache_hits: int = 0
    cache_lookups: int = 0
    started: float = field(default_factory=time.time)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def round(self, seqs: int, new_tokens: int, seconds: float) -> None:
        with self.lock:
            self.rounds += 1
            self.busy_s += seconds
            self.seq_rounds += seqs
            self.max_seqs_per_round = max(self.max_seqs_per_round, seqs)
            self.tokens_generated += new_tokens

    def finished(self, seq: Sequence, outcome: str) -> None:
        """outcome: "served", "aborted" or "failed"."""
        with self.lock:
            setattr(self, f"requests_{outcome}", getattr(self, f"requests_{outcome}") + 1)
            self.prompt_tokens += len(seq.prompt_ids)
            st = seq.stats
            self.drafted += st.drafted
            self.accepted += st.accepted
            self.cache_hits += st.cache_hits
            self.cache_lookups += st.cache_lookups

    def snapshot(self) -> dict:
        with self.lock:
            out = {
                "requests_served": self.requests_served,
                "requests_aborted": self.requests_aborted,
                "requests_failed": self.requests_failed,
                "prompt_tokens": self.prompt_tokens,
                "tokens_generated": self.tokens_generated,
                "tokens_per_s": self.tokens_generated / self.busy_s if self.busy_s else 0.0,
                "rounds": self.rounds,
                "busy_s": round(self.busy_s, 3),
                "uptime_s": round(time.time() - self.started, 3),
                "max_seqs_per_round": self.max_seqs_per_round,
                "mean_seqs_per_round": self.seq_rounds / self.rounds if self.rounds else 0.0,
            }
            if self.drafted:
                out["acceptance_rate"] = self.accepted / self.drafted
            if self.cache_lookups:
                out["cache_hit_rate"] = self.cache_hits / self.cache_lookups
            return out
