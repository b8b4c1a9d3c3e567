"""Decode rounds of a batch: median ms per round of AR over held-out chat prompts, at several batch sizes.

Only one-row calls run the compiled step; a batch runs the eager forward. Point PYTHONPATH at another
checkout's src/ to measure its code the same way.

    python benchmarks/batch_decode.py --batches 1,8,16,32 --max-tokens 24 --json docs/results/batch_decode.json
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

import saguaro  # noqa: E402
from saguaro.llm import LLM  # noqa: E402
from saguaro.prompts import load_prompts  # noqa: E402
from saguaro.sampling import SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8,16,32")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json")
    args = ap.parse_args()
    llm = LLM(mode="ar", threads=args.threads)
    engine = llm.engine
    prompts = load_prompts("sharegpt", "eval")
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    times: list[float] = []
    decode = engine.decode_round

    def timed() -> None:
        t0 = time.perf_counter()
        decode()
        times.append(time.perf_counter() - t0)

    engine.decode_round = timed
    llm.generate(prompts[:2], params, chat=True)  # warm-up
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        times.clear()
        for _ in range(args.repeats):
            llm.generate(prompts[:b], params, chat=True)
        ms = statistics.median(times) * 1e3
        rows.append({"batch": b, "round_ms": ms, "ms_per_token": ms / b, "rounds": len(times)})
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        meta = {**cpu_meta(), "saguaro": str(Path(saguaro.__file__).parent), "threads": args.threads}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
