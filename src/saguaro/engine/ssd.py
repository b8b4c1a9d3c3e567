"""SSD: the target verifies speculation T while the drafter pre-drafts speculation T+1 for the
likeliest outcomes. Verification is the same `verify` as SD, so the output stays exact.

The engine talks to its drafter through `ssd.protocol.Drafter`: the in-process `LocalDrafter` runs
the calls in place (for tests, and where no second core exists); `ssd.client.RemoteDrafter` runs them
in a worker process, where the tree is built while the target verifies.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from saguaro.engine.auto import RoundChoice, RoundRule
from saguaro.engine.auto_memory import RemembersClocks
from saguaro.engine.base import Engine, decode_one_token
from saguaro.engine.scoring import emitted_logprobs, verify_round
from saguaro.models.transformer import CausalLM
from saguaro.ssd.client import WorkerError
from saguaro.ssd.drafter import Speculation
from saguaro.ssd.online import BandedPolicy, SaguaroPolicy
from saguaro.ssd.protocol import Drafter, LocalDrafter

__all__ = ["CoreSplit", "LocalDrafter", "SSDEngine"]  # LocalDrafter lives in ssd.protocol

log = logging.getLogger(__name__)


@dataclass
class CoreSplit:
    """The CPU cores and torch threads of the target: all of them, or those the draft worker leaves it."""

    all_cores: list[int]
    all_threads: int
    shared_cores: list[int]  # while the worker drafts beside the target
    shared_threads: int

    def threads(self, alone: bool) -> int:
        return self.all_threads if alone else self.shared_threads

    def pin_target(self, alone: bool) -> None:
        """Every thread of this process, not only the caller: a server's event loop left on the
        worker's core, or on one core beside two compute threads, cost ~10% at one client."""
        if hasattr(os, "sched_setaffinity"):
            cores = self.all_cores if alone else self.shared_cores
            for tid in _threads():
                try:
                    os.sched_setaffinity(tid, cores)
                except OSError:  # a thread that ended meanwhile
                    pass
        torch.set_num_threads(self.threads(alone))


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # no procfs: the calling thread only
        return [0]


class SSDEngine(RemembersClocks, Engine):
    mode = "ssd"

    def __init__(self, target: CausalLM, drafter: Drafter, k: int, stop_token_ids: set[int],
                 max_batch_size: int = 64, local_fallback: Callable[[], Drafter] | None = None,
                 policy: SaguaroPolicy | None = None, prompt_lookup_min_match: int = 0,
                 round_rule: RoundRule | None = None):
        """local_fallback: makes an in-process drafter to finish with if the worker fails.
        policy: fan-out and fallback per round; required for a remote drafter, default for a
        LocalDrafter: the fan-out and fallback it was built with, never refitted.
        prompt_lookup_min_match: greedy rows repeating their last n >= this many tokens take the
        prompt-lookup continuation ahead of the cache (0: never); an attribute, so it can change
        between requests.
        round_rule: mode "auto": whether the next round speculates or runs AR, told how each round
        went (engine/auto.py); None always speculates."""
        super().__init__(target, stop_token_ids, max_batch_size)
        self.round_rule = round_rule
        if round_rule is not None:
            self.mode = "auto"
        self.cores: CoreSplit | None = None  # where the target runs in SSD rounds and in AR rounds
        self._round_mode = "ssd"
        self.drafter, self.k = drafter, k
        if policy is None:
            if not isinstance(drafter, LocalDrafter):
                raise ValueError("a drafter other than a LocalDrafter needs a policy")
            policy = drafter.fixed_policy()
        self.policy = BandedPolicy(policy)  # greedy and sampled rows fit their own fan-out
        self.tree_fanout = [0] * (k + 1)  # the fan-out of the tree being built now
        self.local_fallback = local_fallback
        self.prompt_lookup_min_match = prompt_lookup_min_match
        self.degraded: str | None = None  # why the engine left its worker, if it did
        self.sent: dict[int, int] = {}  # seq id -> tokens of its context the drafter has
        self.outcome: dict[int, tuple[int, int]] = {}  # seq id -> outcome of its last round
        self.totals = {"rounds": 0, "respond_s": 0.0, "verify_s": 0.0, "tree_s": 0.0, "fallback_s": 0.0}
        self._prefilling = []
        # mode auto: False once AR-only stretches went by without telling the drafter (its rows
        # are then stale), until the next SSD round gives it every running row afresh
        self._drafter_synced = True

    @property
    def lookahead(self) -> int:
        return self.k + 1

    def _guarded(self, call, *args):
        """Run a drafter call; if the worker fails, switch to a local drafter once and retry."""
        try:
            return call(self.drafter)(*args)
        except WorkerError as e:
            if self.local_fallback is None:
                raise
            self._degrade(str(e))
            return None

    def _degrade(self, reason: str) -> None:
        log.warning("%s; finishing every request with a local draft (SD)", reason)
        self.degraded = reason
        try:
            self.drafter.close()
        except Exception:  # the worker is gone already
            pass
        self.drafter = self.local_fallback()
        self.local_fallback = None
        # the rows being prefilled: new ones, or (a resync) the running ones again, listed once
        seqs = self.running + [s for s in self._prefilling if all(s is not r for r in self.running)]
        if seqs and self._drafter_synced:  # the local drafter starts from what the worker had been told
            self.drafter.prefill([s.id for s in seqs], [s.all_ids[: self.sent[s.id]] for s in seqs],
                                 [s.params for s in seqs], [s.params.seed for s in seqs])
        self.outcome.clear()

    def prefill(self, seqs) -> None:
        if self.round_rule is not None:  # prefill on the cores the next round will have
            self._enter(self._choose(self.running + seqs).mode)
        super().prefill(seqs)

    def _resync_drafter(self) -> None:
        """Give the drafter every running row afresh, its context up to the last token (which the
        next respond feeds): it missed the rows that joined or grew during AR-only rounds."""
        seqs = self.running
        self._guarded(lambda d: d.retire, [])
        for s in seqs:
            self.sent[s.id] = len(s.all_ids) - 1
        self.outcome.clear()
        self._drafter_synced = True
        self._prefilling = seqs
        self._guarded(lambda d: d.prefill, [s.id for s in seqs], [s.all_ids[:-1] for s in seqs],
                      [s.params for s in seqs], [s.params.seed for s in seqs])
        self._prefilling = []

    def on_prefill(self, seqs, ids, lengths, cache, states=None) -> None:
        for s in seqs:
            self.sent[s.id] = len(s.prompt_ids)
        if self.round_rule is not None and (self._round_mode == "ar" or not self._drafter_synced):
            self._drafter_synced = False  # AR rounds next: the drafter's prefill would be wasted work
            return
        self._prefilling = seqs
        self._guarded(lambda d: d.prefill, [s.id for s in seqs], [s.prompt_ids for s in seqs],
                      [s.params for s in seqs], [s.params.seed for s in seqs])
        self._prefilling = []

    def on_retire(self, keep: list[int]) -> None:
        if self._drafter_synced:
            self._guarded(lambda d: d.retire, keep)
        alive = {s.id for s in self.running}
        for table in (self.sent, self.outcome):
            for sid in [x for x in table if x not in alive]:
                del table[sid]

    def decode_round(self) -> None:
        if self.round_rule is None:
            self._speculative_round()
            return
        seqs = list(self.running)

        def run(choice: RoundChoice) -> None:
            self._enter(choice.mode)
            if choice.mode == "ar":
                decode_one_token(self.target, self.cache, seqs, self.stop_ids)
                for s in seqs:  # no speculation was verified: the drafter's tree for these rows is stale
                    self.outcome.pop(s.id, None)
                return
            if not self._drafter_synced:
                self._resync_drafter()
            self._speculative_round()

        self.measured_round(seqs, "ssd", run)

    def _choose(self, seqs) -> RoundChoice:
        return self.round_rule(len(seqs), sum(not s.params.greedy for s in seqs))

    def _enter(self, mode: str) -> None:
        """AR rounds give the target every core (the worker idles); SSD rounds leave the worker its own."""
        alone = mode == "ar"
        # also re-pin if someone else moved the threads (a benchmark placing modes in turn)
        moved = self.cores is not None and torch.get_num_threads() != self.cores.threads(alone)
        if self.cores is not None and (mode != self._round_mode or moved):
            self.cores.pin_target(alone)
        self._round_mode = mode

    def _speculative_round(self) -> None:
        seqs, k = self.running, self.k
        t0 = time.perf_counter()
        outcomes = [self.outcome.get(s.id) for s in seqs]
        new = [s.all_ids[self.sent[s.id]:] for s in seqs]
        looked_up = self.tree_fanout
        policy = self.policy.select(sum(not s.params.greedy for s in seqs))
        fanout = [0] * (k + 1) if self.degraded else policy.fanout  # degraded: plain SD
        fallback = "neural" if self.degraded else policy.next_fallback(len(seqs))
        specs = self._guarded(lambda d: d.respond, outcomes, new, fanout, fallback,
                              self.prompt_lookup_min_match)
        if specs is None:  # the worker failed: ask the local drafter, which has no outcomes yet
            outcomes = [None] * len(seqs)
            fanout, fallback = [0] * (k + 1), "neural"
            specs = self.drafter.respond(outcomes, new, fanout, fallback, self.prompt_lookup_min_match)
        self.tree_fanout = fanout
        for s in seqs:
            self.sent[s.id] = len(s.all_ids)
        self.drafter.build_tree()  # in a worker this overlaps the verification below
        t1 = time.perf_counter()
        tokens = torch.tensor([sp.tokens for sp in specs])
        last = torch.tensor([[s.last_token] for s in seqs])
        logits = self.target(torch.cat([last, tokens], 1).to(self.target.device), self.cache)

        def draft_q(p: torch.Tensor) -> torch.Tensor | None:
            if all(sp.q is None for sp in specs):
                return None
            one_hot = torch.zeros(k, p.shape[-1], dtype=p.dtype)
            return torch.stack([sp.q.to(p.dtype) if sp.q is not None
                                else one_hot.scatter(1, torch.tensor(sp.tokens)[:, None], 1.0) for sp in specs]).to(p.device)

        accepted, emitted, logp = verify_round(logits, seqs, tokens, draft_q)
        accepted, emitted = accepted.cpu(), emitted.cpu()
        t2 = time.perf_counter()
        self.drafter.finish_tree()
        self.cache.lengths += (accepted + 1).to(self.cache.lengths.device)
        tree_s, fallback_s = self.drafter.tree_s, self.drafter.fallback_s
        accepted_list, emitted_list = accepted.tolist(), emitted.tolist()
        rows = [sp.tokens[:a] + [t] for sp, a, t in zip(specs, accepted_list, emitted_list)]
        logprobs = emitted_logprobs(logp, seqs, rows)
        for s, sp, a, t, out, row, lps in zip(seqs, specs, accepted_list, emitted_list, outcomes, rows, logprobs):
            s.append(row, self.stop_ids, lps)
            self.outcome[s.id] = (a, t)
            self._count(s.stats, sp, a, out, t1 - t0, t2 - t1, tree_s + fallback_s)
            if not self.degraded and sp.source != "lookup":  # prompt lookup says nothing of draft or cache
                self.policy.observe(a, k, None if out is None else out[0], None if out is None else sp.hit,
                                    fallback, looked_up, sampled=not s.params.greedy)
        if not self.degraded:
            fallback_rows = sum(sp.source not in ("tree", "lookup") for sp in specs)
            self.policy.observe_times(t2 - t1, tree_s, fallback_s, fallback, fallback_rows)
        for key, value in (("respond_s", t1 - t0), ("verify_s", t2 - t1), ("tree_s", tree_s),
                           ("fallback_s", fallback_s)):
            self.totals[key] += value
        self.totals["rounds"] += 1

    def _count(self, st, spec: Speculation, accepted: int, outcome, wait_s: float, verify_s: float,
               busy_s: float) -> None:
        st.rounds += 1
        st.drafted += self.k
        st.accepted += accepted
        st.draft_s += wait_s
        st.verify_s += verify_s
        st.draft_busy_s += busy_s
        if spec.source == "lookup":
            st.lookup_rounds += 1
            st.accepted_on_lookup += accepted
        elif outcome is not None:  # the first round after prefill has nothing to look up
            st.cache_lookups += 1
            st.cache_hits += spec.hit
            if spec.hit:
                st.accepted_on_hit += accepted
            else:
                st.accepted_on_miss += accepted

    def close(self) -> None:
        self.remember_clocks()
        self.drafter.close()
        if self.cores is not None:  # give the target back the cores the worker had
            self.cores.pin_target(alone=True)
            self.cores = None
