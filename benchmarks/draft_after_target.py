"""What a target step costs the draft step after it: SD's draft runs right after the target's sweep of
~96 MB of weights, which can evict the draft's few MB from the caches, so it reads them from memory
again. Times, on the embedded pair as `--mode sd` loads it (compiled, the CPU kernels), a target step
(1 and 5 tokens in turn, KV 300) followed by two draft steps: the first pays the eviction, the second
runs back to back. Medians over --repeats rounds; one JSON line.

    python benchmarks/draft_after_target.py --threads 2 [--repeats 200]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from saguaro import LLM
from saguaro.bench import cpu_flags


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--kv", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = LLM(mode="sd", threads=args.threads).engine
    target, draft = engine.target, engine.speculator.draft
    caches = []
    for model in (target, draft):
        cache = model.new_cache(1, args.kv + 64)
        model(torch.randint(0, 1000, (1, args.kv)), cache)
        cache.lengths[:] = args.kv
        caches.append(cache)
    one, five = torch.randint(0, 1000, (1, 1)), torch.randint(0, 1000, (1, 5))
    times: dict[str, list[float]] = {"target_ms": [], "draft_after_target_ms": [], "draft_after_draft_ms": []}
    for i in range(args.repeats + 20):
        t0 = time.perf_counter()
        target(five if i % 2 else one, caches[0])
        t1 = time.perf_counter()
        draft(one, caches[1])
        t2 = time.perf_counter()
        draft(one, caches[1])
        t3 = time.perf_counter()
        if i >= 20:
            for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                times[key].append(1000 * dt)
    row = {key: round(sorted(v)[len(v) // 2], 4) for key, v in times.items()}
    print(json.dumps({"threads": args.threads, **row, "cpu": cpu_flags()}), flush=True)


if __name__ == "__main__":
    main()
