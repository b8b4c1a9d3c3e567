"""The cached attention op of this tree against another commit's, interleaved in one process.

REV's `models/csrc/attention.cpp` is built with its ops under another namespace (as `ab_kernels.py`
does for the linears), and both run the embedded target's shapes (9 query heads over 3 key/value
heads of 64, bfloat16) for all 30 layers per sweep, T queries after a KV cache of --kv tokens, the two
taking turns sweep by sweep. Each T reports the median sweep, and each side's largest deviation from a
float64 attention over the same bfloat16 inputs.

    python benchmarks/ab_attention.py 4cb93f6 --threads 1 --tokens 1 5 [--json F]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from ab_kernels import build_rev

from saguaro.bench import cpu_flags
from saguaro.loader import cache_root
from saguaro.models import cpu_kernels

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 30, 9, 3, 64


def reference(q, k_cache, v_cache, mask) -> torch.Tensor:
    """float64 attention of q [1, H, T, D] over the cache's first mask.size(-1) slots of layer 0."""
    span = mask.size(-1)
    keys = k_cache[0, :, :, :span].double().repeat_interleave(HEADS // KV_HEADS, 1)
    vals = v_cache[0, :, :, :span].double().repeat_interleave(HEADS // KV_HEADS, 1)
    scores = (q.double() @ keys.transpose(-1, -2) / HEAD_DIM ** 0.5).masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1) @ vals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kv", type=int, default=300)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--sweeps", type=int, default=300)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    assert cpu_kernels.load(cache_root() / "kernels"), "needs saguaro's CPU kernels (AVX512_BF16)"
    with tempfile.TemporaryDirectory() as tmp:
        theirs = getattr(torch.ops, build_rev(args.rev, "attention.cpp", Path(tmp))).cached_attention
    ours = torch.ops.saguaro_cpu.cached_attention
    g = torch.Generator().manual_seed(0)
    capacity = args.kv + max(args.tokens) + 16
    k_cache = torch.randn(LAYERS, 1, KV_HEADS, capacity, HEAD_DIM, generator=g).bfloat16()
    v_cache = torch.randn(LAYERS, 1, KV_HEADS, capacity, HEAD_DIM, generator=g).bfloat16()
    rows = []
    for tokens in args.tokens:
        q = torch.randn(1, HEADS, tokens, HEAD_DIM, generator=g).bfloat16()
        k, v = (torch.randn(1, KV_HEADS, tokens, HEAD_DIM, generator=g).bfloat16() for _ in range(2))
        slots = torch.arange(args.kv, args.kv + tokens)[None]
        mask = (torch.arange(args.kv + tokens) <= slots[:, :, None])[:, None]  # causal over the new tokens
        errors = []
        for op in (theirs, ours):
            out = op(q, k, v, k_cache, v_cache, 0, slots, mask)
            errors.append(float((out.double() - reference(q, k_cache, v_cache, mask)).abs().max()))
        times: list[list[float]] = [[], []]
        for _ in range(args.sweeps):
            for op, out in zip((theirs, ours), times):
                t0 = time.perf_counter()
                for layer in range(LAYERS):
                    op(q, k, v, k_cache, v_cache, layer, slots, mask)
                out.append(time.perf_counter() - t0)
        rev_ms, ours_ms = (1000 * sorted(t)[len(t) // 2] for t in times)
        rows.append({"tokens": tokens, f"{args.rev}_ms": rev_ms, "this_tree_ms": ours_ms,
                     f"{args.rev}_max_error": errors[0], "this_tree_max_error": errors[1]})
        print(f"{tokens} tokens x {LAYERS} layers  {args.rev} {rev_ms:6.3f} ms  this tree {ours_ms:6.3f} ms  "
              f"max |error| vs float64 {errors[0]:.2e} / {errors[1]:.2e}", flush=True)
    if args.json:
        meta = {"command": "python benchmarks/ab_attention.py " + " ".join(
            f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if v is not None and k not in ("json", "rev")) + f" {args.rev}",
            "cpu": cpu_flags()}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
