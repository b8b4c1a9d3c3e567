"""Aggregate tokens/s and time to first token of `saguaro serve` under concurrent chat clients.

Each server configuration runs as its own process (one at a time, so they never share cores) and is
driven by the official `openai` client: N clients each send held-out ShareGPT chat prompts, streamed,
for a fixed number of tokens (ignore_eos). Configurations alternate (A B A B...) per client count and
temperature so machine drift hits all alike; ratios are against the first configuration.

    python benchmarks/serve_load.py --clients 1,8,32 --temperatures 0,1 --max-tokens 96 \
        --json docs/results/serve_load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from openai import AsyncOpenAI

from saguaro.prompts import load_prompts

log = logging.getLogger("serve_load")
ROOT = Path(__file__).resolve().parents[1]
SAGUARO = [sys.executable, "-m", "saguaro.cli"]
CONFIGS = {"default": [], "ar": ["--mode", "ar"]}


def cpu_meta() -> dict:
    """The command line and the CPU it ran on (model, bf16/avx512 flags, cores), for a result's JSON."""
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    flags = next((ln.split(":", 1)[1].split() for ln in cpu.splitlines() if ln.startswith("Flags")), [])
    return {"command": shlex.join(["python"] + sys.argv), "cpu": platform.processor() or "",
            "model": next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), ""),
            "avx512_bf16": "avx512_bf16" in flags, "avx512f": "avx512f" in flags, "cores": os.cpu_count(),
            "flags": " ".join(flags)}


def start_server(args: list[str], port: int, timeout_s: float = 120) -> subprocess.Popen:
    cmd = SAGUARO + ["serve", "--port", str(port)] + args
    log.info("starting %s", shlex.join(cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server did not become healthy within {timeout_s:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


async def load(port: int, prompts: list[str], clients: int, temperature: float, max_tokens: int) -> dict:
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    model = (await client.models.list()).data[0].id
    t0 = time.perf_counter()
    rows = await asyncio.gather(*[
        one_client(client, model, prompts[i % len(prompts)], temperature, max_tokens, i) for i in range(clients)])
    wall = time.perf_counter() - t0
    await client.close()
    total = sum(r["tokens"] for r in rows)
    return {"tokens": total, "wall_s": wall, "tokens_per_s": total / wall,
            "ttft_median_s": statistics.median(r["ttft_s"] for r in rows if r["ttft_s"] is not None)}


async def one_client(client, model, prompt, temperature, max_tokens, seed):
    stream_t0 = time.perf_counter()
    first, tokens = None, 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
        temperature=temperature, seed=seed, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True})
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - stream_t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"tokens": tokens, "ttft_s": first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--temperatures", default="0,1")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=2, help="A B rounds per cell")
    ap.add_argument("--configs", default="default,ar", help=f"from {sorted(CONFIGS)}")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    prompts = load_prompts("sharegpt", "eval")
    configs = args.configs.split(",")
    clients = [int(c) for c in args.clients.split(",")]
    temps = [float(t) for t in args.temperatures.split(",")]
    results = {c: {} for c in configs}
    for rep in range(args.repeats):
        for name in configs if rep % 2 == 0 else configs[::-1]:
            proc = start_server(CONFIGS[name], args.port)
            try:
                asyncio.run(load(args.port, prompts, 1, 0.0, 8))  # warm-up
                for n in clients:
                    for t in temps:
                        r = asyncio.run(load(args.port, prompts, n, t, args.max_tokens))
                        results[name].setdefault(f"{n}@{t:g}", []).append(r)
                        log.info("%s clients=%d T=%g: %.1f tok/s, TTFT %.2f s", name, n, t,
                                 r["tokens_per_s"], r["ttft_median_s"])
            finally:
                stop_server(proc)
    base = configs[-1]
    table = []
    for key in results[configs[0]]:
        n, t = key.split("@")
        row = {"clients": int(n), "temperature": float(t)}
        for name in configs:
            runs = results[name][key]
            row[f"{name}_tokens_per_s"] = statistics.mean(r["tokens_per_s"] for r in runs)
            row[f"{name}_ttft_s"] = statistics.mean(r["ttft_median_s"] for r in runs)
        for name in configs[:-1]:
            row[f"{name}_over_{base}"] = row[f"{name}_tokens_per_s"] / row[f"{base}_tokens_per_s"]
        table.append(row)
    head = ["clients", "T"] + [f"{c} tok/s" for c in configs] + [f"{c}/{base}" for c in configs[:-1]] + \
        [f"{c} TTFT s" for c in configs]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in table:
        cells = [str(row["clients"]), f"{row['temperature']:g}"]
        cells += [f"{row[f'{c}_tokens_per_s']:.1f}" for c in configs]
        cells += [f"{row[f'{c}_over_{base}']:.2f}" for c in configs[:-1]]
        cells += [f"{row[f'{c}_ttft_s']:.2f}" for c in configs]
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))
    if args.json:
        meta = {**cpu_meta(), "configs": {c: shlex.join(["saguaro", "serve"] + CONFIGS[c]) for c in configs}}
        Path(args.json).write_text(json.dumps({"meta": meta, "table": table, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
