"""`saguaro bench`: decoding modes side by side on the same prompts, in one process run.

Modes: ar, sd (our distilled draft), sd-ngram (prompt lookup), ssd (Saguaro, draft worker), hf
(transformers `generate`), hf-assisted (transformers with our draft as assistant; see bench_hf),
llamacpp and llamacpp-f32 (llama.cpp on the target's GGUF, or on its F32 copy; see bench_llamacpp).
Prompts are grouped into batches of --batch-size, each batch one `engine.run` (one `generate`
for hf; llama.cpp runs the batch's prompts one after another). Modes run interleaved batch by
batch (the order rotates), so machine drift hits all alike; one warm-up generation per mode is
excluded. Speedups are ratios of totals from this run.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import replace

import torch
from tqdm import tqdm

from saguaro.engine.sequence import Sequence
from saguaro.prompts import load_prompts
from saguaro.sampling import SamplingParams
from saguaro.ssd.options import SSDOptions

log = logging.getLogger(__name__)

MODES = ("ar", "sd", "sd-ngram", "ssd", "auto", "hf", "hf-assisted", "llamacpp", "llamacpp-f32")
HF_MODES = ("hf", "hf-assisted")
LLAMACPP_MODES = ("llamacpp", "llamacpp-f32")


def parse_mode(spec: str) -> tuple[str, str | None]:
    """A bench mode -> (engine mode, draft): 'sd-ngram' is SD with the n-gram speculator; 'auto' is the
    default's speculation-or-AR per round (engine/auto.py)."""
    if spec not in MODES:
        raise ValueError(f"unknown bench mode {spec!r}; choose from {', '.join(MODES)}")
    if spec == "sd-ngram":
        return "sd", "ngram"
    return spec, None


def check_modes(specs: list[str]) -> None:
    """Every mode known, and the peers' packages importable: fails before any model loads."""
    for spec in specs:
        parse_mode(spec)
    if any(spec in LLAMACPP_MODES for spec in specs):
        from saguaro.bench_llamacpp import import_llama_cpp

        import_llama_cpp()
        if any(spec in ("ssd", "auto") for spec in specs):  # measured, not understood: see the README's limits
            log.warning("llama.cpp ran slower beside an SSD engine in one process (72 -> 52 tok/s on 2 cores, "
                        "threads re-pinned or not): bench it in an invocation of its own")


class EngineRunner:
    """One of our engines; a batch is one `engine.run` call."""

    def __init__(self, engine):
        self.engine = engine

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[dict]:
        seqs = [Sequence(list(p), sp) for p, sp in zip(prompts, params)]
        self.engine.run(seqs)
        return [dict(s.metrics(), output_ids=list(s.output_ids)) for s in seqs]

    def close(self) -> None:
        self.engine.close()


class PeerBenchRunner:
    """A peer's runner (bench_hf.HFRunner, bench_llamacpp.LlamaCppRunner) with our per-sequence metric
    names (only token counts: peers report no rounds)."""

    def __init__(self, runner):
        self.runner = runner

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[dict]:
        t0 = time.perf_counter()
        outs = self.runner.generate(prompts, params)
        wall = time.perf_counter() - t0
        seqs = [{"generated_tokens": len(o), "output_ids": o} for o in outs]
        ttfts = getattr(self.runner, "last_ttfts", None)  # llama.cpp: one prompt after another
        if ttfts and len(ttfts) == len(outs):
            for seq, ttft in zip(seqs, ttfts):
                seq["ttft_s"] = ttft
            decode_s = wall - sum(ttfts)  # the prompts ran one by one: wall = sum of their times
            rest = sum(len(o) - 1 for o in outs)
            for seq, o in zip(seqs, outs):  # the decode time shared out per generated token
                seq["decode_ms_per_token"] = 1000 * decode_s / rest if rest > 0 and len(o) > 1 else None
        return seqs

    def close(self) -> None:
        self.runner.close()


def make_runners(llm, modes: list[str], k: int, draft, ssd: SSDOptions | None = None) -> dict:
    runners = {}
    hf_target = None
    for spec in modes:
        mode, spec_draft = parse_mode(spec)
        if mode in HF_MODES:
            from saguaro import bench_hf
            from saguaro.embedded import embedded_draft_path

            hf_target = hf_target or bench_hf.load_hf_target(llm.target_path)
            assistant = None
            if mode == "hf-assisted":
                draft_path = draft if draft not in (None, "ngram") else embedded_draft_path()
                assistant = bench_hf.draft_as_hf_assistant(draft_path, hf_target, k)
            runners[spec] = PeerBenchRunner(bench_hf.HFRunner(hf_target, llm.tokenizer.stop_token_ids, assistant))
        elif mode in LLAMACPP_MODES:
            from saguaro import bench_llamacpp

            runners[spec] = PeerBenchRunner(bench_llamacpp.make_runner(
                mode, llm.target_path, llm.tokenizer.stop_token_ids, threads=torch.get_num_threads(),
                n_ctx=llm.target.config.max_position))
        else:
            if mode == "auto":  # what LLM(mode="auto") weighs against AR on this machine
                from saguaro.llm import auto_speculation

                options = replace(ssd or SSDOptions(), auto=True)
                engine = llm.make_engine(auto_speculation(draft, str(llm.target.device), options), draft, k,
                                         ssd=options)
            else:
                engine = llm.make_engine(mode, spec_draft or draft, k, ssd=ssd if mode in ("ssd", "sd") else None)
            runners[spec] = EngineRunner(engine)
    return runners


def run_batch(runner, prompts: list[list[int]], params: list[SamplingParams]) -> dict:
    t = time.perf_counter()
    seqs = runner.generate(prompts, params)
    wall = time.perf_counter() - t
    return {"wall_s": wall, "tokens": sum(s["generated_tokens"] for s in seqs), "seqs": seqs}


def _weighted_mean(seqs: list[dict], key: str, weight: str = "rounds") -> float | None:
    pairs = [(s[key], s.get(weight, 1)) for s in seqs if s.get(key) is not None]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


def summarize(batches: list[dict]) -> dict:
    """Totals and spreads of one mode on one dataset. ms/token of a batch is its wall time per
    generated token (for batch size 1: the request's latency per token)."""
    seqs = [s for b in batches for s in b["seqs"]]
    tokens = sum(b["tokens"] for b in batches)
    wall = sum(b["wall_s"] for b in batches)
    per_token = [1000 * b["wall_s"] / b["tokens"] for b in batches if b["tokens"]]
    out = {
        "prompts": len(seqs),
        "batches": len(batches),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall else 0.0,
        "ms_per_token_median": statistics.median(per_token) if per_token else None,
        "ms_per_token_min": min(per_token) if per_token else None,
        "ms_per_token_max": max(per_token) if per_token else None,
        "ms_per_token_stdev": statistics.stdev(per_token) if len(per_token) > 1 else 0.0,
    }
    timed = [s for s in seqs if s.get("decode_ms_per_token") is not None]
    if timed:  # decode alone (after each prompt's first token): the forward's speed, prefill aside
        decode_tokens = sum(s["generated_tokens"] - 1 for s in timed)
        decode_s = sum(s["decode_ms_per_token"] * (s["generated_tokens"] - 1) / 1000 for s in timed)
        out["decode_tokens_per_s"] = decode_tokens / decode_s if decode_s > 0 else None
        out["ttft_s_mean"] = statistics.mean(s["ttft_s"] for s in timed if s.get("ttft_s") is not None)
    rounds = sum(s.get("rounds", 0) for s in seqs)
    if rounds:
        accepted = sum(s.get("accepted_tokens", 0) for s in seqs)  # under auto, a row may run AR only
        drafted = sum(s.get("drafted_tokens", 0) for s in seqs)
        out.update(rounds=rounds, mean_accepted=accepted / rounds,
                   acceptance_rate=accepted / drafted if drafted else 0.0,
                   draft_s=sum(s.get("draft_s", 0.0) for s in seqs), verify_s=sum(s.get("verify_s", 0.0) for s in seqs))
    for key in ("cache_hit_rate", "draft_hidden_fraction"):  # SSD only (the latter when the engine reports it)
        value = _weighted_mean(seqs, key)
        if value is not None:
            out[key] = value
    return out


def add_ratios(results: dict, raw: dict, modes: list[str], greedy: bool) -> None:
    """Speedups vs AR and SD, and (greedy) whether each mode's outputs equal AR's, prompt by prompt."""
    base, sd = results.get("ar"), results.get("sd")
    for m, r in results.items():
        if base and base["tokens_per_s"]:
            r["speedup_vs_ar"] = r["tokens_per_s"] / base["tokens_per_s"]
        if sd and sd["tokens_per_s"]:
            r["speedup_vs_sd"] = r["tokens_per_s"] / sd["tokens_per_s"]
    if not greedy or "ar" not in modes:
        return
    want = [s["output_ids"] for b in raw["ar"] for s in b["seqs"]]
    for m in modes:
        got = [s["output_ids"] for b in raw[m] for s in b["seqs"]]
        same = sum(a == b for a, b in zip(want, got))
        results[m]["identical_to_ar"] = same == len(want)
        results[m]["identical_prompts"] = same
        if same < len(want):  # reported, not asserted: float rounding may flip a near-tie
            log.warning("%s: %d of %d greedy outputs differ from ar", m, len(want) - same, len(want))


def bench(llm, modes: list[str], datasets: list[str], num_prompts: int, max_tokens: int,
          temperature: float = 0.0, k: int = 4, draft: str | None = None, seed: int = 0, batch_size: int = 1,
          ssd: SSDOptions | None = None) -> dict:
    ssd = ssd or SSDOptions()
    runners = make_runners(llm, modes, k, draft, ssd)
    prompts = {d: [llm.tokenizer.encode_chat([{"role": "user", "content": p}])
                   for p in load_prompts(d, "eval")[:num_prompts]] for d in datasets}
    batches = {d: [list(range(i, min(i + batch_size, len(prompts[d]))))
                   for i in range(0, len(prompts[d]), batch_size)] for d in datasets}

    def params(i: int, tokens: int = max_tokens) -> SamplingParams:  # prompt i draws the same seed in every mode
        return SamplingParams(temperature=temperature, max_tokens=tokens, seed=seed + i)

    first = batches[datasets[0]][0]
    for runner in runners.values():  # warm-up, excluded
        run_batch(runner, [prompts[datasets[0]][i] for i in first], [params(i, 4) for i in first])
    raw = {d: {m: [] for m in modes} for d in datasets}
    total = sum(len(b) for b in batches.values()) * len(modes)
    try:
        with tqdm(total=total, desc="bench", unit="batch") as bar:
            for d in datasets:
                for j, idx in enumerate(batches[d]):
                    order = modes[j % len(modes):] + modes[: j % len(modes)]
                    for spec in order:
                        raw[d][spec].append(run_batch(runners[spec], [prompts[d][i] for i in idx],
                                                      [params(i) for i in idx]))
                        bar.update(1)
    finally:
        for runner in runners.values():
            runner.close()
    results = {}
    for d in datasets:
        results[d] = {m: summarize(raw[d][m]) for m in modes}
        add_ratios(results[d], raw[d], modes, temperature == 0)
    return {
        "config": {"modes": modes, "datasets": datasets, "num_prompts": num_prompts, "max_tokens": max_tokens,
                   "temperature": temperature, "k": k, "batch_size": batch_size, "seed": seed,
                   "threads": torch.get_num_threads(), "dtype": str(llm.target.dtype).removeprefix("torch."),
                   "weights": getattr(llm, "weights", "dense"),
                   "compiled": llm.target.compiled is not None, "cpu": cpu_flags(),
                   "ssd": ssd.as_json() if "ssd" in modes else None},
        "results": results,
    }


def cpu_flags() -> str:
    """The CPU model and the vector flags that decide kernel speed, to sit beside every number."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown"
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{model} ({' '.join(wanted)})"


def format_table(report: dict) -> str:
    lines = [f"{'dataset':10} {'mode':12} {'tok/s':>7} {'ms/tok':>7} {'accept':>7} {'acc.len':>7} "
             f"{'hit':>5} {'hidden':>6} {'vs AR':>6} {'vs SD':>6} {'same':>5}"]
    for d, modes in report["results"].items():
        for m, r in modes.items():
            def f(key, fmt):
                v = r.get(key)
                ok = isinstance(v, (int, float)) and not isinstance(v, bool)
                return format(v, fmt) if ok else "-".rjust(int(fmt.split(".")[0]))
            lines.append(f"{d:10} {m:12} {f('tokens_per_s', '7.2f')} {f('ms_per_token_median', '7.1f')} "
                         f"{f('acceptance_rate', '7.2f')} {f('mean_accepted', '7.2f')} {f('cache_hit_rate', '5.2f')} "
                         f"{f('draft_hidden_fraction', '6.2f')} {f('speedup_vs_ar', '6.2f')} "
                         f"{f('speedup_vs_sd', '6.2f')} {str(r.get('identical_to_ar', '-')):>5}")
    return "\n".join(lines)


def write_json(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
