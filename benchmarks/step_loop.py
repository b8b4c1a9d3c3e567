"""Run the engine's compiled default step (bfloat16 over the GGUF's blocks, embedded target, KV cache of
300 tokens) in a loop, for a sampling profiler to attach to, and print its median time.

    python benchmarks/step_loop.py --threads 1 --tokens 5 --seconds 14 &
    # once it prints READY:
    perf record -o step5.data -p $! -- sleep 8 && perf report -i step5.data --no-children --sort dso,symbol

docs/results.md ("Where a verification's time goes") splits the 1- and 5-token steps this way.
"""

from __future__ import annotations

import argparse
import time

import torch

from forward_paths import prefilled
from saguaro.embedded import embedded_target_path
from saguaro.gguf_blocks import read_blocks
from saguaro.loader import cache_root, load_model
from saguaro.models import cpu_kernels
from saguaro.models.compiled import compile_step
from saguaro.models.linear import use_file_blocks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=14.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with torch.inference_mode():
        model = load_model(embedded_target_path(), dtype=torch.bfloat16)
        use_file_blocks(model, read_blocks(embedded_target_path(), cpu_kernels.BLOCK_FORMATS),
                        cache_root() / "kernels")
        model.compiled = compile_step(model, cache_root() / "compiled", [(args.tokens, None)])
        cache = prefilled(model, 300)
        x = torch.randint(0, 1000, (1, args.tokens))
        for _ in range(20):
            model(x, cache)
        print("READY", flush=True)
        times, start = [], time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            t = time.perf_counter()
            model(x, cache)
            times.append(time.perf_counter() - t)
    print(f"{args.tokens} tokens, {args.threads} threads: median {1000 * sorted(times)[len(times) // 2]:.2f} ms "
          f"over {len(times)} steps")


if __name__ == "__main__":
    main()
