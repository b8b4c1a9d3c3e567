"""Prefill of a burst of held-out chat prompts: one padded batch against batches of similar lengths.

N server clients arriving at once are prefilled together. Padded to the longest prompt, a batch of
held-out ShareGPT prompts computes several times the positions it holds; `prefill_groups` splits it
into batches that waste at most PREFILL_SLACK. Both ways run in turn on the same engine and prompts.

    python benchmarks/prefill_batches.py --clients 8,32 --repeats 3 --json docs/results/prefill_batches.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import cpu_meta  # noqa: E402

from saguaro.engine.base import PREFILL_SLACK, prefill_groups  # noqa: E402
from saguaro.engine.sequence import Sequence  # noqa: E402
from saguaro.llm import LLM  # noqa: E402
from saguaro.prompts import load_prompts  # noqa: E402
from saguaro.sampling import SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="8,32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json")
    args = ap.parse_args()
    llm = LLM(mode="ar", threads=args.threads)
    engine = llm.engine
    prompts = [llm.encode(p, chat=True) for p in load_prompts("sharegpt", "eval")]
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    rows = []
    for n in (int(c) for c in args.clients.split(",")):
        batch = prompts[:n]
        lengths = [len(p) for p in batch]
        groups = prefill_groups(lengths, PREFILL_SLACK)
        times = {"one batch": [], "groups": []}
        outputs = {}
        for rep in range(args.repeats + 1):  # the first round warms up
            for name, slack in (("one batch", float("inf")), ("groups", PREFILL_SLACK)):
                engine.prefill_slack = slack
                seqs = [Sequence(p, params) for p in batch]
                t0 = time.perf_counter()
                engine.run(seqs)
                if rep:
                    times[name].append(time.perf_counter() - t0)
                outputs[name] = [s.output_ids for s in seqs]
        row = {"clients": n, "prompt_tokens": sum(lengths), "longest": max(lengths),
               "positions_one_batch": n * max(lengths),
               "positions_groups": sum(len(g) * max(lengths[i] for i in g) for g in groups), "groups": len(groups),
               **{f"{k}_s": statistics.median(v) for k, v in times.items()},
               "same_first_tokens": outputs["one batch"] == outputs["groups"]}
        row["speedup"] = row["one batch_s"] / row["groups_s"]
        rows.append(row)
        print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": cpu_meta(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
