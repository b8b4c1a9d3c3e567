"""SSD against SD and AR on the embedded pair, each mode on the cores it would really get, one run.

  ar        the target alone on every core
  sd-1core  SD with the draft on the target's core (the paper's baseline: same target hardware)
  sd-2core  SD with both cores for target and draft in turn (equal hardware)
  sd-2core-stop  the same, each row drafting on only past tokens the draft was sure of
            (--min-confidence, default the one mode auto uses)
  ssd       the target on one core, the draft worker on the other, overlapping
  ssd-no-lookup  the same without prompt lookup ahead of the cache (the paper's mechanism alone)

Greedy rows in every SD and SSD mode take prompt lookup's continuation where their last 3 tokens
occurred before (--lookup-min-match; 0 leaves the paper's mechanisms alone).

Modes run interleaved prompt by prompt (order rotating), so machine drift hits all alike; one
warm-up generation per mode is excluded. The ceiling of SSD over sd-1core at equal acceptance is
1 + T_draft / T_verify per round, both measured in sd-1core's rounds of this run.

    python benchmarks/ssd_vs_sd.py [--k 3] [--num-prompts 4] [--max-tokens 64] [--temperature 0]
                                   [--json runs/ssd_vs_sd.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time

import torch
from tqdm import tqdm

from saguaro import LLM
from saguaro.bench import EngineRunner, cpu_flags, run_batch, summarize
from saguaro.llm import auto_mode
from saguaro.prompts import load_prompts
from saguaro.sampling import SamplingParams
from saguaro.speculators.draft import is_feature_checkpoint
from saguaro.ssd.options import AUTO_MIN_CONFIDENCE, PROMPT_LOOKUP_MIN_MATCH

log = logging.getLogger("ssd_vs_sd")


# An SSD worker pre-drafts the next round while the target verifies; when a request ends, that tree is
# still being built on the draft core for up to a round. Measured without a pause, the mode run next
# (AR or auto, on every core) shared a core with it: auto, which followed SSD in 3 of 4 prompts, lost
# ~40 ms of time to first token per request that a loop of its own does not show.
SETTLE_S = 0.2


def place(cores: list[int]) -> None:
    """Every thread of the process on `cores`: an SSD run pins the compute threads to the target's core,
    and two OpenMP threads left on one core wait on each other at every barrier (AR measured 20x slower)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except OSError:  # a thread that ended meanwhile
            pass
    torch.set_num_threads(len(cores))


class NoLookup(EngineRunner):
    """SSD without prompt lookup ahead of the cache: the paper's mechanism alone."""

    def generate(self, prompts, params):
        saved, self.engine.prompt_lookup_min_match = self.engine.prompt_lookup_min_match, 0
        try:
            return super().generate(prompts, params)
        finally:
            self.engine.prompt_lookup_min_match = saved


def per_round(summary: dict) -> dict:
    """SD/SSD round costs from bench.summarize's totals."""
    if not summary.get("rounds"):
        return summary
    rounds = summary["rounds"]
    return dict(summary, tokens_per_round=(summary["tokens"] - summary["prompts"]) / rounds,
                draft_ms_per_round=1000 * summary["draft_s"] / rounds,
                verify_ms_per_round=1000 * summary["verify_s"] / rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--num-prompts", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--datasets", default="humaneval,sharegpt")
    ap.add_argument("--fanout-budget", type=int, default=0)
    ap.add_argument("--modes", help="a subset of ar,sd-1core,sd-2core,sd-2core-stop,ssd,ssd-no-lookup,auto "
                                    "(default: all)")
    ap.add_argument("--min-confidence", type=float, default=AUTO_MIN_CONFIDENCE,
                    help="sd-2core-stop: where a row stops drafting (default %(default)s)")
    ap.add_argument("--draft", help="draft checkpoint (default: the embedded one); a feature-conditioned draft "
                                    "runs the SD modes and auto (SD or AR), not SSD")
    ap.add_argument("--weights", default="auto", choices=["auto", "file", "file-int8", "dense"],
                    help="what the target's linears multiply by (saguaro --weights)")
    ap.add_argument("--lookup-min-match", type=int, default=PROMPT_LOOKUP_MIN_MATCH,
                    help="greedy rows repeating their last N tokens take prompt lookup's continuation, in SD and "
                         "SSD alike (0: never)")
    ap.add_argument("--json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("needs two cores")
    llm = LLM(mode="ar", weights=args.weights)
    feature = is_feature_checkpoint(args.draft)
    wanted = args.modes.split(",") if args.modes else ["ar", "sd-1core", "sd-2core", "sd-2core-stop", "ssd",
                                                        "ssd-no-lookup", "auto"]
    if feature and {"ssd", "ssd-no-lookup"} & set(wanted):
        raise SystemExit("SSD does not run a feature-conditioned draft yet: leave ssd and ssd-no-lookup out of --modes")
    ssd = None
    lookup = {"prompt_lookup_min_match": args.lookup_min_match}
    if {"ssd", "ssd-no-lookup"} & set(wanted):
        ssd = llm.make_engine("ssd", args.draft, args.k, fanout_budget=args.fanout_budget, draft_cores=cores[-1:],
                              **lookup)
        if ssd.degraded:
            raise SystemExit(f"draft worker did not start: {ssd.degraded}")
    sd = llm.make_engine("sd", args.draft, args.k, **lookup)
    place(cores)  # the auto engine takes every core in its AR rounds: it must see them all when made
    if llm.target.compiled is not None:  # sd-2core verifies (and drafts) on every core: those steps as well
        llm.target.compiled.ensure(args.k + 1)
        draft_steps = getattr(getattr(sd.speculator, "draft", None), "compiled", None)
        if draft_steps is not None:
            draft_steps.ensure(1)
    sd_stop = llm.make_engine("sd", args.draft, args.k, min_confidence=args.min_confidence, **lookup)
    if auto_mode(True, "cpu", gpus=0) == "sd" or feature:  # what LLM(mode="auto") runs here
        auto = llm.make_engine("sd", args.draft, args.k, auto=True, **lookup)
    else:
        auto = llm.make_engine("ssd", args.draft, args.k, fanout_budget=args.fanout_budget, draft_cores=cores[-1:],
                               auto=True, **lookup)
    modes = {  # runner, cores it runs on
        "ar": (EngineRunner(llm.engine), cores),
        "sd-1core": (EngineRunner(sd), cores[:1]),
        "sd-2core": (EngineRunner(sd), cores),
        "sd-2core-stop": (EngineRunner(sd_stop), cores),
        "ssd": (EngineRunner(ssd), cores[:-1]),
        "ssd-no-lookup": (NoLookup(ssd), cores[:-1]),  # the same engine and worker, lookup off
        "auto": (EngineRunner(auto), cores),  # the default: speculation or AR round by round (engine/auto.py)
    }
    modes = {m: modes[m] for m in wanted}
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=0)
    datasets = args.datasets.split(",")
    prompts = {d: [llm.tokenizer.encode_chat([{"role": "user", "content": p}])
                   for p in load_prompts(d, "eval")[: args.num_prompts]] for d in datasets}
    warm = SamplingParams(temperature=args.temperature, max_tokens=4)
    for name, (runner, on) in modes.items():  # warm-up, excluded
        place(on)
        runner.generate([prompts[datasets[0]][0]], [warm])
    names = list(modes)
    raw = {d: {m: [] for m in names} for d in datasets}
    with tqdm(total=len(names) * sum(map(len, prompts.values())), desc="ssd vs sd", unit="gen") as bar:
        for d in datasets:
            for i, ids in enumerate(prompts[d]):
                for name in names[i % len(names):] + names[: i % len(names)]:
                    runner, on = modes[name]
                    place(on)
                    time.sleep(SETTLE_S)  # the last mode's draft worker finishes its leftover tree first
                    raw[d][name].append(run_batch(runner, [ids], [params]))
                    bar.update(1)
    place(cores)
    for engine in (ssd, auto):
        if engine is not None:
            engine.close()
    report = {"config": vars(args) | {"cores": cores, "cpu": cpu_flags(),
                                      "fanout": ssd.policy.fanout if ssd else None,
                                      "fitted_acceptance_r": ssd.policy.fitted if ssd else None}, "results": {}}
    for d in datasets:
        res = {m: per_round(summarize(raw[d][m])) for m in names}
        if "auto" in res:  # what auto ran at the end of each request, and why
            res["auto"]["last_reasons"] = [b["seqs"][0].get("auto_reason") for b in raw[d]["auto"]]
        for m in names:
            r = res[m]
            r["speedup_vs_ar"] = r["tokens_per_s"] / res["ar"]["tokens_per_s"]
            # per prompt, against AR on the same prompt moments before or after: a VM's drift over the run
            # moves the totals above, much less the median of these
            per_prompt = [(b["tokens"] / b["wall_s"]) / (a["tokens"] / a["wall_s"])
                          for a, b in zip(raw[d]["ar"], raw[d][m])]
            r["per_prompt_vs_ar_median"] = statistics.median(per_prompt)
            r["per_prompt_vs_ar"] = per_prompt
            for base in ("sd-1core", "sd-2core", "sd-2core-stop"):
                if base in res:
                    r[f"speedup_vs_{base.replace('-', '_')}"] = r["tokens_per_s"] / res[base]["tokens_per_s"]
            if args.temperature == 0:
                r["identical_to_ar"] = all(a["seqs"][0]["output_ids"] == b["seqs"][0]["output_ids"]
                                           for a, b in zip(raw[d]["ar"], raw[d][m]))
        sd1 = res.get("sd-1core")
        for m in ("ssd", "ssd-no-lookup"):
            if sd1 is not None and m in res:
                res[m]["ceiling_vs_sd_1core"] = 1 + sd1["draft_ms_per_round"] / sd1["verify_ms_per_round"]
        report["results"][d] = res
    print(json.dumps(report["results"], indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
