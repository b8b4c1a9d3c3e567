"""The SSD knobs, as one value passed from a face (cli, LLM, bench) down to `make_ssd_engine`.

Light to import (no torch): the command line reads its defaults from here before loading anything."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from saguaro.ssd.online import FALLBACKS, PRIOR_ACCEPTANCE, PRIOR_R

FANOUT_SHAPES = ("geometric", "uniform")
FALLBACK_CHOICES = ("auto", *FALLBACKS)
PROMPT_LOOKUP_MIN_MATCH = 3  # greedy rows repeating their last 3 tokens take the prompt-lookup continuation
# Mode auto's SD stops drafting where the draft is less sure than this. Chosen on the embedded pair
# (held-out HumanEval and ShareGPT prompts, greedy): agreement of the draft's argmax with the target's
# is 0.32-0.43 overall, and a round that drafts on only past tokens the draft gave >= 0.8 came out
# 1.07 / 1.19x AR in the cost model of benchmarks/draft_length.py, against 0.77 / 0.89x for K = 4.
AUTO_MIN_CONFIDENCE = 0.8
LEGACY_NAMES = {"fanout": "fanout_shape", "lookup_min_match": "prompt_lookup_min_match"}


@dataclass(frozen=True)
class SSDOptions:
    """fanout_budget: branches per tree; 0 starts at 3(K+1) and, when fitting, resizes the budget so
    the tree fits in a verification. fanout_shape: how the budget spreads over outcome positions.
    acceptance, r: the priors a_p and r that shape a geometric fan-out. fit: refit them (and so the
    fan-out) from the rounds; False keeps the priors. saguaro_c: Saguaro sampling C (1: plain).
    fallback: how cache misses are drafted ("auto" picks per round). prompt_lookup_min_match: greedy
    rows repeating their last n >= this many tokens take the prompt-lookup continuation ahead of the
    cache, and in SD (a whole greedy batch) ahead of the draft (0: never). worker: draft in a worker
    process (False: in this process, no overlap).
    draft_cores / draft_threads: where a CPU worker runs (default: the last core, one thread per core).
    worker_timeout: seconds to wait for one answer of the worker (None: the client's default,
    ssd.client.WORKER_TIMEOUT_S). draft_worker: HOST:PORT of a worker started with `saguaro
    draft-worker --listen` to attach to (None: spawn one); worker_token: its secret (default:
    $SAGUARO_WORKER_TOKEN; never printed). auto: choose SSD or AR round by round (engine/auto.py).
    min_confidence (SD with a token draft): a row stops drafting after a token where the draft's top
    probability was below this; None: AUTO_MIN_CONFIDENCE when mode auto runs SD, 0 (always K)
    for mode "sd"."""

    fanout_budget: int = 0
    fanout_shape: str = "geometric"
    acceptance: float = PRIOR_ACCEPTANCE
    r: float = PRIOR_R
    fit: bool = True
    saguaro_c: float = 1.0
    fallback: str = "auto"
    prompt_lookup_min_match: int = PROMPT_LOOKUP_MIN_MATCH
    worker: bool = True
    draft_cores: tuple[int, ...] | None = None
    draft_threads: int | None = None
    worker_timeout: float | None = None
    draft_worker: str | None = None
    worker_token: str | None = field(default=None, repr=False)
    auto: bool = False
    min_confidence: float | None = None

    def __post_init__(self):
        if self.draft_cores is not None:
            object.__setattr__(self, "draft_cores", tuple(self.draft_cores))
        problem = next(_problems(self), None)
        if problem is not None:
            raise ValueError(problem)

    @classmethod
    def of(cls, base: SSDOptions | None = None, **changes) -> SSDOptions:
        """`base` (default: the defaults) with keyword changes; the older keywords `fanout` (the shape)
        and `lookup_min_match` still work, so `LLM(..., fanout="uniform")` keeps working."""
        for old, new in LEGACY_NAMES.items():
            if old in changes:
                if new in changes:
                    raise TypeError(f"pass {new} or {old}, not both")
                changes[new] = changes.pop(old)
        unknown = sorted(set(changes) - set(cls.__dataclass_fields__))
        if unknown:
            raise TypeError(f"unknown SSD option(s): {', '.join(unknown)}")
        return replace(base or cls(), **changes)

    def as_json(self) -> dict:
        """The options for a report: the worker's secret left out."""
        out = asdict(self)
        del out["worker_token"]
        if self.draft_cores is not None:
            out["draft_cores"] = list(self.draft_cores)
        return out


def _problems(o: SSDOptions):
    """One line per out-of-range option."""
    if o.fanout_budget < 0:
        yield f"fanout_budget (--fanout-budget) must be >= 0, got {o.fanout_budget}"
    if o.fanout_shape not in FANOUT_SHAPES:
        yield f"fanout_shape (--fanout) must be one of {FANOUT_SHAPES}, got {o.fanout_shape!r}"
    if not 0 < o.acceptance < 1:
        yield f"acceptance (--acceptance) must be in (0, 1), got {o.acceptance}"
    if not o.r > 0:
        yield f"r (--power-r) must be > 0, got {o.r}"
    if not 0 <= o.saguaro_c <= 1:
        yield f"saguaro_c (--saguaro-c) must be in [0, 1], got {o.saguaro_c}"
    if o.fallback not in FALLBACK_CHOICES:
        yield f"fallback (--fallback) must be one of {FALLBACK_CHOICES}, got {o.fallback!r}"
    if o.prompt_lookup_min_match < 0:
        yield f"prompt_lookup_min_match (--lookup-min-match) must be >= 0, got {o.prompt_lookup_min_match}"
    if o.draft_cores is not None and (not o.draft_cores or min(o.draft_cores) < 0):
        yield f"draft_cores (--draft-cores) must be core numbers >= 0, got {list(o.draft_cores)}"
    if o.draft_threads is not None and o.draft_threads < 1:
        yield f"draft_threads (--draft-threads) must be >= 1, got {o.draft_threads}"
    if o.worker_timeout is not None and not o.worker_timeout > 0:
        yield f"worker_timeout (--worker-timeout) must be > 0, got {o.worker_timeout}"
    if o.min_confidence is not None and not 0 <= o.min_confidence <= 1:
        yield f"min_confidence (--min-confidence) must be in [0, 1], got {o.min_confidence}"
    if o.draft_worker is not None and not _is_host_port(o.draft_worker):
        yield f"draft_worker (--draft-worker) must be HOST:PORT, got {o.draft_worker!r}"


def _is_host_port(text: str) -> bool:
    host, sep, port = text.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)
