"""SSD against SD and AR on the embedded pair, each mode on the cores it would really get, one run.

  ar        the target alone on every core
  sd-1core  SD with the draft on the target's core (the paper's baseline: same target hardware)
  sd-2core  SD with both cores for target and draft in turn (equal hardware)
  ssd       the target on one core, the draft worker on the other, overlapping

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
from saguaro.engine.sequence import Sequence
from saguaro.prompts import load_prompts
from saguaro.sampling import SamplingParams

log = logging.getLogger("ssd_vs_sd")


def place(cores: list[int]) -> None:
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))


def generate(engine, ids: list[int], params: SamplingParams) -> dict:
    seq = Sequence(list(ids), params)
    t = time.perf_counter()
    engine.run([seq])
    m = seq.metrics()
    m["wall_s"] = time.perf_counter() - t
    m["output_ids"] = seq.output_ids
    return m


def total(rows: list[dict], key: str) -> float:
    return sum(r.get(key) or 0.0 for r in rows)


def summarize(rows: list[dict]) -> dict:
    tokens, wall, rounds = total(rows, "generated_tokens"), total(rows, "wall_s"), total(rows, "rounds")
    out = {"tokens": int(tokens), "tokens_per_s": tokens / wall,
           "ms_per_token": [1000 * r["wall_s"] / r["generated_tokens"] for r in rows]}
    out["ms_per_token_median"] = statistics.median(out["ms_per_token"])
    if rounds:
        out.update(acceptance_rate=total(rows, "accepted_tokens") / total(rows, "drafted_tokens"),
                   tokens_per_round=(tokens - len(rows)) / rounds,
                   draft_ms_per_round=1000 * total(rows, "draft_s") / rounds,
                   verify_ms_per_round=1000 * total(rows, "verify_s") / rounds)
    lookups = [r for r in rows if r.get("cache_hit_rate") is not None]
    if lookups:
        out["cache_hit_rate"] = statistics.mean(r["cache_hit_rate"] for r in lookups)
        busy = total(rows, "draft_busy_s")
        out["draft_hidden_fraction"] = max(0.0, 1 - total(rows, "draft_s") / busy) if busy else None
        out["draft_busy_ms_per_round"] = 1000 * busy / rounds
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--num-prompts", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--datasets", default="humaneval,sharegpt")
    ap.add_argument("--fanout-budget", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("needs two cores")
    llm = LLM(mode="ar")
    ssd = llm.make_engine("ssd", None, args.k, fanout_budget=args.fanout_budget, draft_cores=cores[-1:])
    if ssd.degraded:
        raise SystemExit(f"draft worker did not start: {ssd.degraded}")
    sd = llm.make_engine("sd", None, args.k)
    modes = {  # engine, cores it runs on
        "ar": (llm.engine, cores),
        "sd-1core": (sd, cores[:1]),
        "sd-2core": (sd, cores),
        "ssd": (ssd, cores[:-1]),
    }
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=0)
    datasets = args.datasets.split(",")
    prompts = {d: [llm.tokenizer.encode_chat([{"role": "user", "content": p}])
                   for p in load_prompts(d, "eval")[: args.num_prompts]] for d in datasets}
    for name, (engine, on) in modes.items():  # warm-up, excluded
        place(on)
        generate(engine, prompts[datasets[0]][0], SamplingParams(temperature=args.temperature, max_tokens=4))
    names = list(modes)
    raw = {d: {m: [] for m in names} for d in datasets}
    with tqdm(total=len(names) * sum(map(len, prompts.values())), desc="ssd vs sd", unit="gen") as bar:
        for d in datasets:
            for i, ids in enumerate(prompts[d]):
                for name in names[i % len(names):] + names[: i % len(names)]:
                    engine, on = modes[name]
                    place(on)
                    raw[d][name].append(generate(engine, ids, params))
                    bar.update(1)
    place(cores)
    ssd.close()
    report = {"config": vars(args) | {"cores": cores, "fanout": ssd.policy.fanout,
                                      "fitted_acceptance_r": ssd.policy.fitted}, "results": {}}
    for d in datasets:
        res = {m: summarize(raw[d][m]) for m in names}
        for m in names:
            r = res[m]
            r["speedup_vs_ar"] = r["tokens_per_s"] / res["ar"]["tokens_per_s"]
            r["speedup_vs_sd_1core"] = r["tokens_per_s"] / res["sd-1core"]["tokens_per_s"]
            r["speedup_vs_sd_2core"] = r["tokens_per_s"] / res["sd-2core"]["tokens_per_s"]
            if args.temperature == 0:
                r["identical_to_ar"] = all(a["output_ids"] == b["output_ids"]
                                           for a, b in zip(raw[d]["ar"], raw[d][m]))
            r.pop("ms_per_token")
        sd1 = res["sd-1core"]
        res["ssd"]["ceiling_vs_sd_1core"] = 1 + sd1["draft_ms_per_round"] / sd1["verify_ms_per_round"]
        report["results"][d] = res
    print(json.dumps(report["results"], indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
