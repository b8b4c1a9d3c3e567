"""Target forward time per path on this CPU: eager float32 / bfloat16 (dense weights, or the GGUF file's
own Q4_1/Q8_0 blocks, the default, with bfloat16 or int8 activations), and
optionally the engine's compiled steps (models/compiled.py: AOTInductor), side by side.

A measurement for choosing the fast forward, not engine code. Embedded target, KV cache of --kv tokens,
median of --repeats calls of each --tokens count (default 1, a decode step, and K+1 = 5, a verification);
the paths take turns call by call.

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


def prefilled(model, kv: int):
    cache = model.new_cache(1, kv + 64)
    model(torch.randint(0, 1000, (1, kv)), cache)
    cache.lengths[:] = kv
    return cache


def interleaved_ms(models: list, kv: int, tokens: int, repeats: int) -> list[float]:
    """Median ms of one forward of `tokens` tokens per model, the models taking turns call by call (so
    a drift in the machine's speed falls on all of them alike)."""
    caches = [prefilled(m, kv) for m in models]
    x = torch.randint(0, 1000, (1, tokens))
    times: list[list[float]] = [[] for _ in models]
    for i in range(repeats + 3):
        for model, cache, out in zip(models, caches, times):
            t = time.perf_counter()
            model(x, cache)
            if i >= 3:
                out.append(time.perf_counter() - t)
    return [1000 * sorted(t)[len(t) // 2] for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kv", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--compile", action="store_true",
                    help="also time the compiled steps (minutes the first time, then loaded from the cache)")
    ap.add_argument("--paths", nargs="*", choices=["dense", "file", "file-int8"],
                    help="only these weight paths (float32 runs with dense)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 5],
                    help="tokens per call: 1 is a decode step, K+1 a verification")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows, models = [], []
    with torch.inference_mode():
        paths = [(torch.float32, "dense"), (torch.bfloat16, "dense"), (torch.bfloat16, "file"),
                 (torch.bfloat16, "file-int8")]
        paths = [p for p in paths if not args.paths or p[1] in args.paths]
        for dtype, weights in paths:
            model = load_model(embedded_target_path(), dtype=dtype)
            if weights.startswith("file"):  # the GGUF's own Q4_1/Q8_0 blocks (models/csrc/*block_linear.cpp)
                use_file_blocks(model, read_blocks(embedded_target_path(), cpu_kernels.BLOCK_FORMATS),
                                cache_root() / "kernels", int8_activations=weights == "file-int8")
            else:
                use_kernels(model, cache_root() / "kernels")
            models.append(model)
            rows.append({"dtype": str(dtype).removeprefix("torch."), "weights": weights, "threads": args.threads})
        for tokens in args.tokens:
            for row, ms in zip(rows, interleaved_ms(models, args.kv, tokens, args.repeats)):
                row[f"eager_{tokens}_ms"] = ms
        if args.compile:
            for row, model in zip(rows, models):
                t = time.perf_counter()
                model.compiled = compile_step(model, cache_root() / "compiled", [(t, None) for t in args.tokens])
                row["compile_or_load_s"] = time.perf_counter() - t
            for tokens in args.tokens:
                for row, ms in zip(rows, interleaved_ms(models, args.kv, tokens, args.repeats)):
                    row[f"compiled_{tokens}_ms"] = ms
        for row in rows:
            print(json.dumps(row), flush=True)
    if args.json:
        flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        meta = {"command": "python benchmarks/forward_paths.py " + " ".join(
            f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" if not isinstance(v, bool) else f"--{k}"
            for k, v in vars(args).items()
            if v not in (None, False) and k != "json"),
            "avx512_bf16": "avx512_bf16" in flags, "avx512f": "avx512f" in flags}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
