"""Target forward time per path on this CPU: eager float32 / bfloat16 (dense weights, or the GGUF file's
own Q4_1/Q8_0 blocks, the default), and
optionally the engine's compiled steps (models/compiled.py: AOTInductor, 1 and 5 tokens), side by side.

A measurement for choosing the fast forward, not engine code. Embedded target, KV cache of --kv tokens,
median of --repeats calls, 1 token (a decode step) and K+1 = 5 tokens (a verification).

    python benchmarks/forward_paths.py --threads 1 [--compile] [--json docs/results/forward_paths.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time

import torch

from saguaro.embedded import embedded_target_path
from saguaro.loader import cache_root, load_model
from saguaro.gguf_blocks import read_blocks
from saguaro.models import cpu_kernels
from saguaro.models.compiled import compile_step
from saguaro.models.linear import use_file_blocks, use_kernels


def timed(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * sorted(times)[len(times) // 2]


def prefilled(model, kv: int):
    cache = model.new_cache(1, kv + 64)
    model(torch.randint(0, 1000, (1, kv)), cache)
    cache.lengths[:] = kv
    return cache


def eager_ms(model, kv: int, tokens: int, repeats: int) -> float:
    cache = prefilled(model, kv)
    x = torch.randint(0, 1000, (1, tokens))
    return timed(lambda: model(x, cache), repeats)


def compiled_ms(model, kv: int, repeats: int) -> tuple[float, float, float]:
    """The engine's compiled step (models/compiled.py) at 1 and 5 tokens, and seconds to build or load it."""
    t = time.perf_counter()
    model.compiled = compile_step(model, cache_root() / "compiled", [(1, None), (5, None)])
    ready_s = time.perf_counter() - t
    one, five = eager_ms(model, kv, 1, repeats), eager_ms(model, kv, 5, repeats)  # now compiled
    model.compiled = None
    return one, five, ready_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kv", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--compile", action="store_true",
                    help="also time the compiled steps (minutes the first time, then loaded from the cache)")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with torch.inference_mode():
        for dtype, weights in ((torch.float32, "dense"), (torch.bfloat16, "dense"), (torch.bfloat16, "file")):
            model = load_model(embedded_target_path(), dtype=dtype)
            if weights == "file":  # the default: the GGUF's own Q4_1/Q8_0 blocks (models/csrc/block_linear.cpp)
                use_file_blocks(model, read_blocks(embedded_target_path(), cpu_kernels.BLOCK_FORMATS),
                                cache_root() / "kernels")
            else:
                use_kernels(model, cache_root() / "kernels")
            row = {"dtype": str(dtype).removeprefix("torch."), "weights": weights, "threads": args.threads,
                   "eager_1_ms": eager_ms(model, args.kv, 1, args.repeats),
                   "eager_5_ms": eager_ms(model, args.kv, 5, args.repeats)}
            if args.compile:
                row["compiled_1_ms"], row["compiled_5_ms"], row["compile_or_load_s"] = compiled_ms(
                    model, args.kv, args.repeats)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        meta = {"command": "python benchmarks/forward_paths.py " + " ".join(
            f"--{k} {v}" if not isinstance(v, bool) else f"--{k}" for k, v in vars(args).items()
            if v not in (None, False) and k != "json"),
            "avx512_bf16": "avx512_bf16" in flags, "avx512f": "avx512f" in flags}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
