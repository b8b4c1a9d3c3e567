"""The draft's forward against the target's, as the engine runs each (same dtype, same threads): the
target's compiled decode step over its default weights, and one drafting step of the embedded draft as
`load_draft` prepares it (on int8 Q4_1 blocks where the CPU allows, or with SAGUARO_DRAFT_BLOCKS=none in
bfloat16), eager and with its one-token step compiled as SD runs it, taking turns call by call; KV cache
of --kv tokens, median of --repeats calls.

    python benchmarks/draft_cost.py --threads 1 --json docs/results/draft_cost_1t.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from saguaro.bench import cpu_flags
from saguaro.embedded import embedded_draft_path
from saguaro.llm import LLM
from saguaro.loader import cache_root
from saguaro.models.compiled import compile_step
from saguaro.speculators.draft import DRAFT_BLOCKS_ENV, load_draft


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kv", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--json")
    args = ap.parse_args()
    llm = LLM(mode="ar", threads=args.threads)
    drafts = {}
    for blocks in ("none", None):
        if blocks:
            os.environ[DRAFT_BLOCKS_ENV] = blocks
        else:
            os.environ.pop(DRAFT_BLOCKS_ENV, None)
        name = "bfloat16" if blocks else "default (int8 blocks where possible)"
        drafts[name] = load_draft(embedded_draft_path(), llm.target, llm.tokenizer)
    models = {"target": llm.target, **{f"draft, {k}": d for k, d in drafts.items()}}
    if llm.target.compiled is not None:  # as SD runs it: its one-token step compiled beside the target's
        compiled = load_draft(embedded_draft_path(), llm.target, llm.tokenizer)
        compiled.compiled = compile_step(compiled, cache_root() / "compiled", [(1, None)])
        models["draft, default, compiled (as SD runs it)"] = compiled
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        caches = {}
        for name, model in models.items():
            cache = model.new_cache(1, args.kv + 8)
            model(torch.randint(0, 1000, (1, args.kv)), cache)
            cache.lengths[:] = args.kv
            caches[name] = cache
        x = torch.randint(0, 1000, (1, 1))
        for i in range(args.repeats + 5):
            for name, model in models.items():
                t = time.perf_counter()
                model(x, caches[name])
                if i >= 5:
                    times[name].append(time.perf_counter() - t)
    ms = {name: 1000 * sorted(t)[len(t) // 2] for name, t in times.items()}
    rows = [{"model": name, "ms": value, "x_target": value / ms["target"]} for name, value in ms.items()]
    for r in rows:
        print(f"{r['model']:45s} {r['ms']:7.3f} ms   {r['x_target']:.3f} of the target's step")
    if args.json:
        meta = {"command": f"python benchmarks/draft_cost.py --threads {args.threads} --kv {args.kv} "
                f"--repeats {args.repeats}", "cpu": cpu_flags(), "dtype": llm.dtype, "weights": llm.weights,
                "compiled": llm.target.compiled is not None}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
