"""Greedy output of the compiled forward against the eager one on held-out chat prompts (AR, b=1), and
of compiled SD and SSD against compiled AR, per dtype: which prompts give the same tokens, and where the first
difference is. The compiled and eager paths sum in different orders, so a near-tie may go either way;
SD and SSD against AR on the same path must be identical.

    python benchmarks/compiled_vs_eager.py [--prompts 8] [--max-tokens 96] [--json docs/results/compiled_vs_eager.json]
"""

from __future__ import annotations

import argparse
import json

from saguaro.llm import LLM, SamplingParams
from saguaro.prompts import load_prompts


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--json")
    args = ap.parse_args()
    half = args.prompts // 2
    prompts = load_prompts("sharegpt")[:half] + load_prompts("humaneval")[:args.prompts - half]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    report = {}
    for dtype in args.dtypes.split(","):
        outs = {}
        for path, compile in (("compiled", True), ("eager", False)):
            llm = LLM(mode="ar", dtype=dtype, compile=compile)
            outs[f"{path} ar"] = [o.outputs[0].token_ids for o in (llm.generate(p, params, chat=True)[0] for p in prompts)]
            if compile:
                for mode in ("sd", "ssd"):
                    llm.engine = llm.make_engine(mode, k=4)
                    outs[f"compiled {mode}"] = [o.outputs[0].token_ids for o in (llm.generate(p, params, chat=True)[0]
                                                                                  for p in prompts)]
                    llm.engine.close()
            llm.close()
        report[dtype] = {
            "compiled sd vs compiled ar": [first_difference(a, b) for a, b in zip(outs["compiled sd"], outs["compiled ar"])],
            "compiled ssd vs compiled ar": [first_difference(a, b) for a, b in zip(outs["compiled ssd"], outs["compiled ar"])],
            "compiled ar vs eager ar": [first_difference(a, b) for a, b in zip(outs["compiled ar"], outs["eager ar"])],
        }
        print(dtype, json.dumps(report[dtype]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python benchmarks/compiled_vs_eager.py", "first_difference_per_prompt": report,
                       "prompts": args.prompts, "max_tokens": args.max_tokens}, f, indent=1)


if __name__ == "__main__":
    main()
