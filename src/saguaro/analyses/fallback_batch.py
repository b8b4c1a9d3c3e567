"""(c) Fallback: speed vs batch size for the neural and the n-gram backup, with b* marked.

On a cache miss the drafter either drafts just in time with the neural draft (slow, good tokens)
or looks up an n-gram (instant, poor tokens). With batch b a round waits for the backup if any of
the b sequences missed, so the n-gram backup wins from some batch size b* on (ssd/speedup.py).

1. Costs, in-process at batch 1 (deterministic): one run per backup gives p_hit, tokens per round
   after a hit and after each backup's miss, and the tree's and the backup's time per round in
   units of one verification; b* = fallback_switch_batch(...) of those.
2. Measured: SSD with each backup (the worker engine) generates the same workload at every batch
   size b: the prompt list cycled to the largest batch size (every copy its own seed), in batches
   of b; total tokens/s.
3. The model's per-sequence speedup (tokens per verification) for both backups vs batch size.
"""

from __future__ import annotations

from matplotlib.ticker import FormatStrFormatter

from saguaro.analyses.common import (AnalysisOptions, chat_prompts, run_prompts, ssd_engine, timed_engine, warm_up,
                                     write_outputs)
from saguaro.analyses.recorder import RoundRecorder
from saguaro.bench_plot import new_figure
from saguaro.ssd.speedup import fallback_switch_batch, ssd_speedup

NAME = "fallback_batch"
BACKUPS = ("neural", "ngram")


def measure_costs(llm, opts: AnalysisOptions, prompts: list[list[int]]) -> dict:
    costs = {}
    for backup in BACKUPS:
        engine = ssd_engine(llm, opts, fallback=backup)
        warm_up(engine, prompts[0], opts.temperature)
        recorder = RoundRecorder(engine)
        try:
            run_prompts(engine, prompts, opts, opts.temperature)
        finally:
            engine.close()
        costs[backup] = recorder.summary()
    return costs


def model_inputs(costs: dict) -> dict | None:
    """The arguments of fallback_switch_batch: p_hit, the tree's cost and the tokens after a hit from
    the neural run; each backup's tokens and time after its misses from its own run. None if a run
    saw no lookups; a backup that never missed gets 1 token at no cost (its weight is 1 - p_hit)."""
    neural, ngram = costs["neural"], costs["ngram"]
    if neural["p_hit"] is None or neural["t_primary"] is None:
        return None

    def given(value, default):
        return default if value is None else value

    return {
        "p_hit": neural["p_hit"],
        "tokens_hit": given(neural["tokens_hit"], 1.0),
        "t_primary": neural["t_primary"],
        "tokens_neural": given(neural["tokens_miss"], 1.0),
        "t_neural": given(neural["t_backup"], 0.0),
        "tokens_ngram": given(ngram["tokens_miss"], 1.0),
        "t_ngram": given(ngram["t_backup"], 0.0),
    }


def model_curves(inputs: dict, max_batch: int) -> dict:
    batches = list(range(1, max_batch + 1))
    curve = {}
    for backup in BACKUPS:
        curve[backup] = [ssd_speedup(inputs["p_hit"], inputs["tokens_hit"], inputs[f"tokens_{backup}"],
                                     inputs["t_primary"], inputs[f"t_{backup}"], b) for b in batches]
    return {"batch": batches, **curve}


def run(llm, opts: AnalysisOptions) -> dict:
    prompts = chat_prompts(llm, opts)
    costs = measure_costs(llm, opts, prompts)
    inputs = model_inputs(costs)
    b_star = fallback_switch_batch(**inputs) if inputs else None
    measured = {backup: [] for backup in BACKUPS}
    biggest = max(opts.batch_sizes)
    workload = [prompts[i % len(prompts)] for i in range(biggest)]
    for backup in BACKUPS:
        engine = timed_engine(llm, opts, fallback=backup, max_batch_size=biggest)
        try:
            warm_up(engine, prompts[0], opts.temperature)
            for b in opts.batch_sizes:
                summary = run_prompts(engine, workload, opts, opts.temperature, batch_size=b)
                measured[backup].append({"batch": b, "tokens_per_s": summary["tokens_per_s"],
                                         "cache_hit_rate": summary.get("cache_hit_rate"),
                                         "mean_accepted": summary.get("mean_accepted")})
        finally:
            engine.close()
    data = {"temperature": opts.temperature, "k": opts.k, "worker": opts.worker, "costs": costs,
            "model_inputs": inputs, "b_star": b_star, "measured": measured,
            "model": model_curves(inputs, max(2 * biggest, (b_star or 0) + 2)) if inputs else None}
    return write_outputs(NAME, data, plot(data), opts) | {"data": data}


def plot(data: dict):
    fig, (left, right) = new_figure(11.0, 4.5, ncols=2)
    for backup, marker in zip(BACKUPS, "os"):
        rows = data["measured"][backup]
        left.plot([r["batch"] for r in rows], [r["tokens_per_s"] for r in rows], marker=marker,
                  label=f"{backup} backup (measured)")
        if data["model"]:
            right.plot(data["model"]["batch"], data["model"][backup], label=f"{backup} backup (model)")
    b_star = data["b_star"]
    for ax in (left, right):
        if b_star is not None:
            ax.axvline(b_star, color="gray", ls="--", label=f"b* = {b_star} (model)")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.set_xlabel("batch size b (sequences, log scale)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    where = "draft worker" if data["worker"] else "in-process drafter"
    left.set_ylabel("throughput (generated tokens/s, all sequences)")
    left.set_title(f"measured SSD speed ({where}), K={data['k']}, T={data['temperature']}", fontsize=9)
    right.set_ylabel("tokens per verification, per sequence")
    right.set_title("Theorem 7 model with the measured costs"
                    + ("" if b_star is not None else " (no b* in range)"), fontsize=9)
    if not data["model"]:
        right.text(0.5, 0.5, "not enough rounds to measure the costs", ha="center", transform=right.transAxes)
    return fig
