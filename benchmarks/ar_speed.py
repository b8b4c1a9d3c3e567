"""AR decode speed on the embedded target: saguaro vs HF transformers, 1 and 2 threads, one run.

ms/token is the decode time per token: (time for N tokens - time for 1 token) / (N - 1), the same
method for both engines, median of --repeats runs. The memory-bandwidth floor is the bytes of
weights read per token divided by the read bandwidth measured here (a large tensor sum).

    python benchmarks/ar_speed.py [--tokens 64] [--repeats 3] [--json runs/ar_speed.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from saguaro.embedded import embedded_target_path
from saguaro.engine.base import AREngine
from saguaro.engine.sequence import Sequence
from saguaro.loader import load_model, resolve_checkpoint
from saguaro.sampling import SamplingParams
from saguaro.tokenizer import Tokenizer

PROMPT = "Write a Python function that checks whether a number is prime."


def read_bandwidth_gbs(size_mb: int = 1024) -> float:
    x = torch.ones(size_mb * 2**20 // 4)
    x.sum()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / min(times) / 1e9


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total - model.embed.weight.element_size() * model.embed.weight.numel() * (
        0 if model.config.tie_embeddings else 1)  # untied input embeddings: one row per token


def ours_time(model, tokenizer, ids, n):
    engine = AREngine(model, tokenizer.stop_token_ids)
    seq = Sequence(list(ids), SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    t = time.perf_counter()
    engine.run([seq])
    return time.perf_counter() - t


def hf_time(hf, ids, n):
    x = torch.tensor([ids])
    t = time.perf_counter()
    hf.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return time.perf_counter() - t


def ms_per_token(fn, n, repeats):
    fn(2)  # warm-up
    runs = [(fn(n) - fn(1)) / (n - 1) * 1000 for _ in range(repeats)]
    return statistics.median(runs), runs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    path = embedded_target_path()
    model = load_model(path)
    tokenizer = Tokenizer.load(resolve_checkpoint(path), model.config.eos_token_ids)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    wbytes = weight_bytes(model)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        bw = read_bandwidth_gbs()
        ours, ours_runs = ms_per_token(lambda n: ours_time(model, tokenizer, ids, n), args.tokens, args.repeats)
        ref, ref_runs = ms_per_token(lambda n: hf_time(hf, ids, n), args.tokens, args.repeats)
        floor = wbytes / (bw * 1e9) * 1000
        row = {"threads": threads, "saguaro_ms_per_token": ours, "hf_ms_per_token": ref,
               "speedup_vs_hf": ref / ours, "bandwidth_gbs": bw, "floor_ms_per_token": floor,
               "ratio_to_floor": ours / floor, "saguaro_runs": ours_runs, "hf_runs": ref_runs}
        results.append(row)
        print(f"threads={threads}: saguaro {ours:.1f} ms/token, HF transformers {ref:.1f} ms/token "
              f"({ref / ours:.2f}x), floor {floor:.1f} ms/token ({wbytes / 1e6:.0f} MB at {bw:.1f} GB/s), "
              f"saguaro/floor {ours / floor:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"weight_bytes": wbytes, "tokens": args.tokens, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
