"""(d) Theorem 7: predicted vs measured SSD speedup over AR, across K, fan-out F and temperature.

For each (K, F, T), with budget F (K+1) branches in the geometric shape:
- the model's inputs come from an in-process run (deterministic): p_hit, tokens per round after a
  hit and after a miss (neural backup), the tree's and the backup's time per round in units of
  one verification (t_primary, t_backup);
- ssd_speedup(...) is then tokens per verification; times the AR time per token over the
  verification time per round, measured in the timed run, it is the predicted speedup over AR
  (on a GPU a verification of K+1 tokens costs about one AR step; on a CPU it costs more, and this
  factor says how much);
- the measured speedup is tokens/s of SSD (the worker engine) over tokens/s of AR, same prompts,
  seeds and temperature, in this process.
"""

from __future__ import annotations

import itertools

from saguaro.analyses.common import (AnalysisOptions, chat_prompts, run_prompts, ssd_engine, timed_engine,
                                     write_outputs)
from saguaro.analyses.recorder import RoundRecorder
from saguaro.bench_plot import new_figure
from saguaro.ssd.speedup import ssd_speedup

NAME = "theorem7"


def ar_baseline(llm, opts: AnalysisOptions, prompts, temperature: float) -> dict:
    engine = llm.make_engine("ar")
    run_prompts(engine, prompts[:1], opts, temperature)  # warm-up
    return run_prompts(engine, prompts, opts, temperature)


def model_inputs(llm, opts: AnalysisOptions, prompts, k: int, budget: int, temperature: float) -> dict:
    engine = ssd_engine(llm, opts, k=k, budget=budget)
    run_prompts(engine, prompts[:1], opts, temperature)  # warm-up, not recorded
    recorder = RoundRecorder(engine)
    try:
        run_prompts(engine, prompts, opts, temperature)
    finally:
        engine.close()
    return recorder.summary()


def predict(inputs: dict, ar_s_per_token: float, verify_s: float | None) -> dict:
    """tokens per verification (the theorem) and the speedup over AR it implies."""
    tokens_miss = inputs["tokens_miss"] if inputs["tokens_miss"] is not None else 1.0
    t_backup = inputs["t_backup"] if inputs["t_backup"] is not None else 0.0
    if None in (inputs["p_hit"], inputs["tokens_hit"], inputs["t_primary"], verify_s):
        return {"tokens_per_verification": None, "speedup_vs_ar": None}
    per_verify = ssd_speedup(inputs["p_hit"], inputs["tokens_hit"], tokens_miss, inputs["t_primary"], t_backup)
    return {"tokens_per_verification": per_verify, "speedup_vs_ar": per_verify * ar_s_per_token / verify_s}


def run(llm, opts: AnalysisOptions) -> dict:
    prompts = chat_prompts(llm, opts)
    ar = {t: ar_baseline(llm, opts, prompts, t) for t in opts.temperatures}
    points = []
    for k, f, t in itertools.product(opts.ks, opts.fanout_sizes, opts.temperatures):
        budget = f * (k + 1)
        inputs = model_inputs(llm, opts, prompts, k, budget, t)
        engine = timed_engine(llm, opts, k=k, budget=budget)
        try:
            run_prompts(engine, prompts[:1], opts, t)  # warm-up
            timed = run_prompts(engine, prompts, opts, t)
        finally:
            engine.close()
        verify_s = timed["verify_s"] / timed["rounds"] if timed.get("rounds") else None
        ar_s_per_token = ar[t]["wall_s"] / ar[t]["tokens"]
        points.append({
            "k": k, "f": f, "budget": budget, "temperature": t, "inputs": inputs,
            "ar_tokens_per_s": ar[t]["tokens_per_s"], "ssd_tokens_per_s": timed["tokens_per_s"],
            "verify_s_per_round": verify_s, "ar_s_per_token": ar_s_per_token,
            "cache_hit_rate": timed.get("cache_hit_rate"), "mean_accepted": timed.get("mean_accepted"),
            "draft_hidden_fraction": timed.get("draft_hidden_fraction"),
            "measured_speedup_vs_ar": timed["tokens_per_s"] / ar[t]["tokens_per_s"],
            "predicted": predict(inputs, ar_s_per_token, verify_s),
        })
    data = {"worker": opts.worker, "points": points}
    return write_outputs(NAME, data, plot(data), opts) | {"data": data}


def plot(data: dict):
    fig, ax = new_figure(6.5, 5.5)
    temps = sorted({p["temperature"] for p in data["points"]})
    shown = [p for p in data["points"] if p["predicted"]["speedup_vs_ar"] is not None]
    for t, marker in zip(temps, "osD^v"):
        pts = [p for p in shown if p["temperature"] == t]
        ax.scatter([p["predicted"]["speedup_vs_ar"] for p in pts], [p["measured_speedup_vs_ar"] for p in pts],
                   marker=marker, label=f"T = {t}")
        for p in pts:
            ax.annotate(f"K={p['k']},F={p['f']}", (p["predicted"]["speedup_vs_ar"], p["measured_speedup_vs_ar"]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
    values = [v for p in shown for v in (p["predicted"]["speedup_vs_ar"], p["measured_speedup_vs_ar"])]
    if values:
        lo, hi = 0.9 * min(values + [1.0]), 1.1 * max(values + [1.0])
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="measured = predicted")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
    ax.axhline(1.0, color="gray", lw=0.6)
    ax.set_xlabel("predicted SSD speedup over AR (Theorem 7, x)")
    ax.set_ylabel("measured SSD speedup over AR (x)")
    where = "draft worker" if data["worker"] else "in-process drafter"
    ax.set_title(f"Theorem 7: predicted vs measured ({where})", fontsize=9)
    ax.legend(fontsize=8)
    return fig
