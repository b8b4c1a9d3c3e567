"""Putting an SSD engine together: fan-out, the worker process and its cores, the local fallback."""

from __future__ import annotations

import json
import logging
import os

import torch

from saguaro.engine import auto_memory
from saguaro.engine.auto import MeasuredRounds
from saguaro.engine.ssd import CoreSplit, SSDEngine
from saguaro.loader import cache_root, resolve_checkpoint
from saguaro.speculators.draft import check_draft_checkpoint, load_draft
from saguaro.ssd.client import WORKER_TIMEOUT_S, RemoteDrafter, WorkerError
from saguaro.ssd.drafter import SSDDrafter
from saguaro.ssd.online import SaguaroPolicy
from saguaro.ssd.options import SSDOptions
from saguaro.ssd.protocol import Drafter, LocalDrafter

log = logging.getLogger(__name__)


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


def make_ssd_engine(target, tokenizer, draft_path, target_path, k: int, stop: set[int], max_batch_size: int,
                    options: SSDOptions | None = None) -> SSDEngine:
    """An SSD engine over `target` with the draft at `draft_path` (see SSDOptions for the knobs).

    The fan-out budget, when not given, starts at 3(K+1) and, when fitting, resizes so the tree fits
    in a verification. A CPU worker runs on `draft_cores` (default: the last core) and the target
    keeps the other cores. If the worker cannot start, the engine runs SSD's fallback (SD with a
    local draft) and says so in its metrics."""
    o = options or SSDOptions()
    draft_cores = list(o.draft_cores) if o.draft_cores is not None else None
    if draft_cores is not None and str(target.device) == "cpu":
        _check_draft_cores(draft_cores, available_cores())
    policy = SaguaroPolicy(k, o.fanout_budget or 3 * (k + 1), o.acceptance, o.r, shape=o.fanout_shape,
                           fallback=o.fallback, fit=o.fit, adapt_budget=o.fit and not o.fanout_budget)
    vocab = target.config.vocab_size

    def local() -> LocalDrafter:  # the SD fallback, also used when no worker is wanted
        return LocalDrafter(SSDDrafter(load_draft(draft_path, target, tokenizer), vocab, k, [0] * (k + 1),
                                       c=o.saguaro_c, fallback="neural"))

    drafter: Drafter | None = None
    degraded = cores_split = None
    if o.worker:
        check_draft_checkpoint(draft_path, vocab, tokenizer)  # the worker does not load a tokenizer
        drafter, cores_split, degraded = _start_worker(target, draft_path, target_path, k, policy, o, draft_cores)
    if drafter is None:
        drafter = local() if o.worker else LocalDrafter(SSDDrafter(
            load_draft(draft_path, target, tokenizer), vocab, k, policy.fanout, c=o.saguaro_c,
            fallback=policy.next_fallback(1)))
    engine = SSDEngine(target, drafter, k, stop, max_batch_size, local_fallback=local if o.worker else None,
                       policy=policy, prompt_lookup_min_match=o.prompt_lookup_min_match,
                       round_rule=MeasuredRounds() if o.auto else None)
    engine.degraded = degraded
    engine.cores = cores_split
    if o.auto:
        remember_auto_clocks(engine, target, target_path, draft_path, k)
    return engine


def remember_auto_clocks(engine, target, target_path, draft_path, k: int, **setup) -> None:
    """Start mode auto's round rule from the clocks an earlier process measured on this setup, and
    have the engine (a RemembersClocks) remember its own (engine/auto_memory.py); `setup`: more of
    what the clocks depend on (how a draft decides its length)."""
    key = auto_memory.setup_key(
        mode=engine.round_rule.speculative, cores=len(available_cores()), threads=torch.get_num_threads(),
        split=getattr(engine, "cores", None) is not None, target=auto_memory.file_identity(target_path),
        draft=auto_memory.file_identity(resolve_checkpoint(draft_path)), k=k, dtype=str(target.dtype),
        compiled=target.compiled is not None, degraded=getattr(engine, "degraded", None) is not None,
        blocks=sorted({m.block_format for m in target.modules() if getattr(m, "block_format", None)}), **setup)
    directory = cache_root() / "auto"
    clocks = auto_memory.load(directory, key)
    if clocks:
        engine.round_rule.recall(clocks)
        log.info("mode auto: starting from the clocks measured before on this setup (%s)",
                 ", ".join(f"{name} {1 / s:.1f} tok/s" for name, s in sorted(clocks.items())))
    engine.auto_memory = (directory, key)


def _start_worker(target, draft_path, target_path, k: int, policy: SaguaroPolicy, o: SSDOptions,
                  draft_cores: list[int] | None) -> tuple[Drafter | None, CoreSplit | None, str | None]:
    """The worker's drafter, the target's cores beside it, and why there is none if it failed
    (a worker asked for by address has no quiet fallback: its failure is raised)."""
    device = str(target.device)
    cores = available_cores()
    if o.draft_worker:  # its cores are another machine's (or process's) to choose
        draft_cores = None
    else:
        draft_cores = draft_cores or (cores[-1:] if device == "cpu" and len(cores) > 1 else None)
    head = json.loads((resolve_checkpoint(draft_path) / "config.json").read_text()).get("saguaro_output_token_ids")
    try:  # the first rounds' fallback: the policy decides again every round
        drafter = RemoteDrafter(target_path, draft_path, k, policy.fanout, target.config.vocab_size,
                                c=o.saguaro_c, fallback=policy.next_fallback(1),
                                dtype=str(target.dtype).removeprefix("torch."), device=draft_device(device),
                                engine_device=device, cores=draft_cores,
                                threads=o.draft_threads or len(draft_cores or [0]),
                                timeout=o.worker_timeout or WORKER_TIMEOUT_S,
                                head_ids=None if head is None else torch.tensor(head),
                                address=o.draft_worker, token=o.worker_token)
    except WorkerError as e:
        if o.draft_worker:
            raise
        log.warning("%s; running SSD's fallback (SD with a local draft) instead (metrics say "
                    "mode 'ssd-degraded')", e)
        return None, None, str(e)
    cores_split = None
    if draft_cores and device == "cpu":  # keep the target off the draft's cores
        rest = [c for c in cores if c not in draft_cores]
        cores_split = CoreSplit(cores, torch.get_num_threads(), rest, len(rest))
        cores_split.pin_target(alone=False)
    return drafter, cores_split, None
