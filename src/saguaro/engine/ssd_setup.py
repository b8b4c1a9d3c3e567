"""Putting an SSD engine together: fan-out, the worker process and its cores, the local fallback."""

from __future__ import annotations

import json
import logging
import os

import torch

from saguaro.engine.auto import choose_round
from saguaro.engine.ssd import CoreSplit, LocalDrafter, SSDEngine
from saguaro.loader import resolve_checkpoint
from saguaro.speculators.draft import load_draft
from saguaro.ssd.client import WORKER_TIMEOUT_S, RemoteDrafter, WorkerError
from saguaro.ssd.drafter import SSDDrafter
from saguaro.ssd.online import SaguaroPolicy

log = logging.getLogger(__name__)

PRIOR_ACCEPTANCE = 0.6  # a_p before anything is measured
PRIOR_R = 0.5  # power-law exponent of misses vs fan-out
LOOKUP_MIN_MATCH = 3  # greedy rows repeating their last 3 tokens take the prompt-lookup continuation


def _affinity() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


PROCESS_CORES = _affinity()  # as the process started, before an SSD engine pins the target to fewer


def available_cores() -> list[int]:
    return list(PROCESS_CORES)


def _check_draft_cores(draft_cores: list[int], cores: list[int]) -> None:
    outside = sorted(set(draft_cores) - set(cores))
    if outside:
        raise ValueError(f"draft cores {outside} are not among this process's cores {cores}")
    if set(cores) <= set(draft_cores):
        raise ValueError(f"draft cores {sorted(draft_cores)} leave no core for the target (cores {cores})")


def draft_device(target_device: str) -> str:
    """The worker's device: its own GPU when there is a second one, else the target's device."""
    if target_device.startswith("cuda") and torch.cuda.device_count() > 1:
        index = torch.device(target_device).index or 0
        return f"cuda:{(index + 1) % torch.cuda.device_count()}"
    return target_device


def make_ssd_engine(target, tokenizer, draft_path, target_path, k, stop, max_batch_size, fanout_budget: int = 0,
                    fanout: str = "geometric", acceptance: float = PRIOR_ACCEPTANCE, r: float = PRIOR_R,
                    saguaro_c: float = 1.0, fallback: str = "auto", worker: bool = True,
                    draft_cores: list[int] | None = None, draft_threads: int | None = None,
                    worker_timeout: float = WORKER_TIMEOUT_S, fit: bool = True,
                    lookup_min_match: int = LOOKUP_MIN_MATCH, auto: bool = False) -> SSDEngine:
    """fit: refit a_p and r (and so the fan-out) from what the rounds show; False keeps the priors.
    fanout_budget 0: start at 3(K+1) branches and, when fitting, resize so the tree fits in a verification.
    draft_cores / draft_threads: where the CPU worker runs (default: the last core, 1 thread); the target
    keeps the other cores. lookup_min_match: see SSDDrafter (0 turns prompt lookup first off).
    auto: choose SSD or AR round by round (engine/auto.py), AR rounds taking every core."""
    if draft_cores is not None and str(target.device) == "cpu":
        _check_draft_cores(draft_cores, available_cores())
    budget = fanout_budget or 3 * (k + 1)
    policy = SaguaroPolicy(k, budget, acceptance, r, shape=fanout, fallback=fallback, fit=fit,
                           adapt_budget=fit and not fanout_budget)
    shape = policy.fanout
    fallback = policy.next_fallback(1)  # the first rounds; the policy decides again every round
    vocab = target.config.vocab_size

    def local() -> LocalDrafter:  # the SD fallback, also used when no worker is wanted
        return LocalDrafter(SSDDrafter(load_draft(draft_path, target, tokenizer), vocab, k, [0] * (k + 1),
                                       c=saguaro_c, fallback="neural"))

    drafter = None
    degraded = None
    device = str(target.device)
    cores_split = None
    if worker:
        cores = available_cores()
        draft_cores = draft_cores or (cores[-1:] if device == "cpu" and len(cores) > 1 else None)
        head = json.loads((resolve_checkpoint(draft_path) / "config.json").read_text()).get("saguaro_output_token_ids")
        try:
            drafter = RemoteDrafter(target_path, draft_path, k, shape, vocab, c=saguaro_c, fallback=fallback,
                                    dtype=str(target.dtype).removeprefix("torch."), device=draft_device(device),
                                    engine_device=device,
                                    cores=draft_cores, threads=draft_threads or len(draft_cores or [0]),
                                    timeout=worker_timeout,
                                    head_ids=None if head is None else torch.tensor(head))
            if draft_cores and device == "cpu":  # keep the target off the draft's cores
                rest = [c for c in cores if c not in draft_cores]
                cores_split = CoreSplit(_affinity(), torch.get_num_threads(), rest, len(rest))
                cores_split.pin_target(alone=False)
        except WorkerError as e:
            log.warning("%s; running SSD's fallback (SD with a local draft) instead (metrics say "
                        "mode 'ssd-degraded')", e)
            degraded = str(e)
    if drafter is None:
        drafter = LocalDrafter(SSDDrafter(load_draft(draft_path, target, tokenizer), vocab, k, shape, c=saguaro_c,
                                          fallback=fallback)) if not worker else local()
    engine = SSDEngine(target, drafter, k, stop, max_batch_size, local_fallback=local if worker else None,
                       policy=policy, lookup_min_match=lookup_min_match, round_rule=choose_round if auto else None)
    engine.degraded = degraded
    engine.cores = cores_split
    return engine
