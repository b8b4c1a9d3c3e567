"""`saguaro bench`: decoding modes side by side on the same prompts, in one process run.

Modes run interleaved prompt by prompt (the order rotates), so machine drift hits all alike;
one warm-up generation per mode is excluded. Speedups are ratios of totals from this run.
"""

from __future__ import annotations

import json
import logging
import statistics
import time

import torch
from tqdm import tqdm

from saguaro.engine.sequence import Sequence
from saguaro.prompts import load_prompts
from saguaro.sampling import SamplingParams

log = logging.getLogger(__name__)


def parse_mode(spec: str) -> tuple[str, str | None]:
    """'ar' | 'sd' (default draft) | 'sd-ngram' -> (engine mode, draft)."""
    if spec == "ar":
        return "ar", None
    if spec == "sd":
        return "sd", None
    if spec == "sd-ngram":
        return "sd", "ngram"
    if spec == "ssd":
        return "ssd", None
    raise ValueError(f"unknown bench mode {spec!r}; choose from ar, sd, sd-ngram, ssd")


def run_one(engine, prompt_ids: list[int], params: SamplingParams) -> dict:
    seq = Sequence(list(prompt_ids), params)
    t = time.perf_counter()
    engine.run([seq])
    m = seq.metrics()
    m["wall_s"] = time.perf_counter() - t
    m["output_ids"] = seq.output_ids
    return m


def summarize(rows: list[dict]) -> dict:
    tokens = sum(r["generated_tokens"] for r in rows)
    wall = sum(r["wall_s"] for r in rows)
    per_token = [1000 * r["wall_s"] / r["generated_tokens"] for r in rows if r["generated_tokens"]]
    out = {
        "prompts": len(rows),
        "tokens": tokens,
        "tokens_per_s": tokens / wall if wall else 0.0,
        "ms_per_token_median": statistics.median(per_token) if per_token else None,
        "ms_per_token_min": min(per_token) if per_token else None,
        "ms_per_token_max": max(per_token) if per_token else None,
    }
    rounds = sum(r.get("rounds", 0) for r in rows)
    hit_rates = [r["cache_hit_rate"] for r in rows if r.get("cache_hit_rate") is not None]
    if hit_rates:
        out["cache_hit_rate"] = statistics.mean(hit_rates)
    if rounds:
        accepted = sum(r["accepted_tokens"] for r in rows)
        drafted = sum(r["drafted_tokens"] for r in rows)
        out.update(
            mean_accepted=accepted / rounds,
            acceptance_rate=accepted / drafted if drafted else 0.0,
            draft_s=sum(r["draft_s"] for r in rows),
            verify_s=sum(r["verify_s"] for r in rows),
        )
    return out


def bench(llm, modes: list[str], datasets: list[str], num_prompts: int, max_tokens: int,
          temperature: float = 0.0, k: int = 4, draft: str | None = None, seed: int = 0, **ssd_options) -> dict:
    engines = {}
    for spec in modes:
        mode, spec_draft = parse_mode(spec)
        engines[spec] = llm.make_engine(mode, spec_draft or draft, k, **(ssd_options if mode == "ssd" else {}))
    prompts = {d: [llm.tokenizer.encode_chat([{"role": "user", "content": p}])
                   for p in load_prompts(d, "eval")[:num_prompts]] for d in datasets}
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed)
    warm = SamplingParams(temperature=temperature, max_tokens=4, seed=seed)
    for spec, engine in engines.items():
        run_one(engine, prompts[datasets[0]][0], warm)
    raw = {d: {m: [] for m in modes} for d in datasets}
    total = sum(len(p) for p in prompts.values()) * len(modes)
    with tqdm(total=total, desc="bench", unit="gen") as bar:
        for d in datasets:
            for i, ids in enumerate(prompts[d]):
                order = modes[i % len(modes):] + modes[: i % len(modes)]
                for spec in order:
                    raw[d][spec].append(run_one(engines[spec], ids, params))
                    bar.update(1)
    results = {}
    for d in datasets:
        results[d] = {m: summarize(raw[d][m]) for m in modes}
        base = results[d].get("ar")
        sd = results[d].get("sd")
        for m, r in results[d].items():
            if base:
                r["speedup_vs_ar"] = r["tokens_per_s"] / base["tokens_per_s"]
            if sd:
                r["speedup_vs_sd"] = r["tokens_per_s"] / sd["tokens_per_s"]
        if temperature == 0 and "ar" in modes:  # exactness check for free: greedy outputs must agree
            for m in modes:
                same = all(a["output_ids"] == b["output_ids"] for a, b in zip(raw[d]["ar"], raw[d][m]))
                results[d][m]["identical_to_ar"] = same
    for engine in engines.values():
        engine.close()
    return {
        "config": {"modes": modes, "datasets": datasets, "num_prompts": num_prompts, "max_tokens": max_tokens,
                   "temperature": temperature, "k": k, "threads": torch.get_num_threads()},
        "results": results,
    }


def format_table(report: dict) -> str:
    lines = [f"{'dataset':10} {'mode':9} {'tok/s':>7} {'ms/tok':>7} {'accept':>7} {'acc.len':>7} "
             f"{'hit':>5} {'vs AR':>6} {'vs SD':>6} {'same':>5}"]
    for d, modes in report["results"].items():
        for m, r in modes.items():
            def f(key, fmt):
                v = r.get(key)
                ok = isinstance(v, (int, float)) and not isinstance(v, bool)
                return format(v, fmt) if ok else "-".rjust(int(fmt.split(".")[0]))
            lines.append(f"{d:10} {m:9} {f('tokens_per_s', '7.2f')} {f('ms_per_token_median', '7.1f')} "
                         f"{f('acceptance_rate', '7.2f')} {f('mean_accepted', '7.2f')} {f('cache_hit_rate', '5.2f')} "
                         f"{f('speedup_vs_ar', '6.2f')} {f('speedup_vs_sd', '6.2f')} "
                         f"{str(r.get('identical_to_ar', '-')):>5}")
    return "\n".join(lines)


def write_json(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
