"""Target forward time per path on this CPU: eager float32 / bfloat16 (prepacked oneDNN linears), and
optionally the one-token step compiled by inductor (freezing, max-autotune, CPP GEMM), side by side.

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
import torch.nn.functional as F

from saguaro.embedded import embedded_target_path
from saguaro.loader import load_model
from saguaro.models.layers import apply_rope


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


def compiled_step(model):
    """The whole one-token step as one inductor graph (weights frozen in); attention in float32."""
    import torch._inductor.config as inductor

    inductor.freezing = True
    inductor.max_autotune = True
    inductor.max_autotune_gemm_backends = "CPP,ATEN"

    def step(ids, cos, sin, slots, mask, k_cache, v_cache):
        b, t = ids.shape
        rows = torch.arange(b)[:, None]
        h = model.embed(ids)
        for i, layer in enumerate(model.layers):
            a = layer.attn
            q, k, v = F.linear(layer.attn_norm(h), a.qkv.weight).split(a.split, dim=-1)
            q = apply_rope(q.view(b, t, a.num_heads, a.head_dim).transpose(1, 2), cos, sin)
            k = apply_rope(k.view(b, t, a.num_kv_heads, a.head_dim).transpose(1, 2), cos, sin)
            k_cache[i][rows, :, slots] = k.transpose(1, 2)
            v_cache[i][rows, :, slots] = v.view(b, t, a.num_kv_heads, a.head_dim)
            span = mask.shape[-1]
            out = F.scaled_dot_product_attention(q.float(), k_cache[i, :, :, :span].float(),
                                                 v_cache[i, :, :, :span].float(), attn_mask=mask,
                                                 enable_gqa=True).to(q.dtype)
            h = h + F.linear(out.transpose(1, 2).reshape(b, t, -1), a.o.weight)
            gate, up = F.linear(layer.mlp_norm(h), layer.mlp.gate_up.weight).split(layer.mlp.intermediate, -1)
            h = h + F.linear(F.silu(gate) * up, layer.mlp.down.weight)
        return F.linear(model.norm(h), model.lm_head.weight).float()

    return torch.compile(step, dynamic=False)


def compiled_ms(model, kv: int, repeats: int) -> tuple[float, float]:
    cache = prefilled(model, kv)
    fn = compiled_step(model)
    pos = torch.tensor([[kv]])
    span = -(-(kv + 1) // 32) * 32
    mask = (torch.arange(span) <= pos[:, :, None])[:, None]
    cos, sin = model.rotary(pos, kv, model.dtype)
    args = (torch.tensor([[42]]), cos, sin, pos, mask, cache.k, cache.v)
    t = time.perf_counter()
    fn(*args)
    compile_s = time.perf_counter() - t
    return timed(lambda: fn(*args), repeats), compile_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kv", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--compile", action="store_true", help="also time the compiled one-token step (minutes)")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            model = load_model(embedded_target_path(), dtype=dtype)
            row = {"dtype": str(dtype).removeprefix("torch."), "threads": args.threads,
                   "eager_1_ms": eager_ms(model, args.kv, 1, args.repeats),
                   "eager_5_ms": eager_ms(model, args.kv, 5, args.repeats)}
            if args.compile:
                row["compiled_1_ms"], row["compile_s"] = compiled_ms(model, args.kv, args.repeats)
                torch._dynamo.reset()
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
