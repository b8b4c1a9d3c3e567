"""What an SSD engine asks of its drafter, and the drafter that answers in this process.

The engine makes the same six calls on every drafter and reads two timings after each round.
`LocalDrafter` (below) runs the calls in place: for tests, and as the SD fallback when no worker
runs. `ssd.client.RemoteDrafter` runs them in a worker process, where the tree is built while the
target verifies. Both conform structurally (no inheritance), as does any wrapper such as the
analyses' round recorder.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from saguaro.sampling import SamplingParams
from saguaro.ssd.drafter import Speculation, SSDDrafter
from saguaro.ssd.online import SaguaroPolicy


@runtime_checkable
class Drafter(Protocol):
    """The SSD draft side as the engine sees it. Rows follow the engine's running batch: `prefill`
    appends rows, `retire` keeps some, and every other call is row-aligned with them."""

    tree_s: float
    """Seconds the drafter spent building the last tree (the pre-drafted outcomes)."""
    fallback_s: float
    """Seconds the last `respond` spent drafting for cache misses."""

    def prefill(self, seq_ids: list[int], prompts: list[list[int]], params: list[SamplingParams],
                seeds: list[int | None], /) -> None:
        """New sequences join as rows at the end; the drafter reads their prompts into its cache."""

    def respond(self, outcomes: list[tuple[int, int] | None], new_tokens: list[list[int]], fanout: list[int],
                fallback: str, prompt_lookup_min_match: int, /) -> list[Speculation]:
        """Row i's last speculation ended in outcomes[i] = (k accepted, emitted token), None for a row
        with no verified speculation yet, and its context grew by new_tokens[i]. Return each row's next
        speculation, q over the target's vocabulary. `fanout` (K+1 branch counts) shapes the next tree,
        `fallback` drafts the misses, and greedy rows repeating their last n >= prompt_lookup_min_match
        tokens take the prompt-lookup continuation first (0: never)."""

    def build_tree(self) -> None:
        """Start pre-drafting the likely outcomes of the speculations just returned (a worker has
        already started by itself; an in-process drafter builds the tree here, before verification)."""

    def finish_tree(self) -> None:
        """Return once the tree of this round is built (after verification, before the next respond)."""

    def retire(self, keep: list[int], /) -> None:
        """Only rows `keep` remain, in this order."""

    def close(self) -> None:
        """Release the drafter (a worker process and its channel); the engine makes no call after."""


class LocalDrafter:
    """The drafter in this process: build_tree runs before verification instead of beside it."""

    def __init__(self, drafter: SSDDrafter):
        self.drafter = drafter
        self.tree_s = self.fallback_s = 0.0

    def fixed_policy(self) -> SaguaroPolicy:
        """The fan-out and fallback this drafter was built with, kept for every round."""
        return SaguaroPolicy.fixed(self.drafter.fanout, self.drafter.fallback)

    def prefill(self, seq_ids, prompts, params, seeds) -> None:
        self.drafter.prefill(seq_ids, prompts, params, seeds)

    def respond(self, outcomes, new_tokens, fanout: list[int], fallback: str,
                prompt_lookup_min_match: int = 0) -> list[Speculation]:
        self.drafter.set_policy(fanout, fallback, prompt_lookup_min_match)
        self.tree_s = self.drafter.tree_s
        specs = self.drafter.respond(outcomes, new_tokens)
        self.fallback_s = self.drafter.fallback_s
        for spec in specs:
            if spec.q is not None:
                spec.q = self.drafter.target_q(spec.q)
        return specs

    def build_tree(self) -> None:
        self.drafter.build_tree()

    def finish_tree(self) -> None:
        """Nothing to wait for: the tree was built in place."""

    def retire(self, keep: list[int]) -> None:
        self.drafter.retire(keep)

    def close(self) -> None:
        pass
