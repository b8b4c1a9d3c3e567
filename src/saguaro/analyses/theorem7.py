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
  seeds and temperature, the two run prompt by prompt in turn.
"""

from __future__ import annotations

import itertools

from saguaro.analyses.common import (AnalysisOptions, chat_prompts, run_prompts, ssd_engine, timed_engine, warm_up,
                                     write_outputs)
from saguaro.analyses.recorder import RoundRecorder
from saguaro.bench import EngineRunner, run_batch, summarize
from saguaro.bench_plot import new_figure
from saguaro.sampling import SamplingParams
from saguaro.ssd.speedup import ssd_speedup

NAME = "theorem7"


def interleaved(engines: dict, prompts, opts: AnalysisOptions, temperature: float) -> dict:
    """Each prompt on every engine in turn (as `saguaro bench` does), so drift hits all alike."""
    runners = {name: EngineRunner(engine) for name, engine in engines.items()}
    for runner in runners.values():
        warm_up(runner.engine, prompts[0], temperature)
    batches = {name: [] for name in engines}
    for i, prompt in enumerate(prompts):
        params = SamplingParams(temperature=temperature, max_tokens=opts.max_tokens, seed=opts.seed + i)
        for name, runner in runners.items():
            batches[name].append(run_batch(runner, [prompt], [params]))
    return {name: summarize(b) for name, b in batches.items()}


def model_inputs(llm, opts: AnalysisOptions, prompts, k: int, budget: int, temperature: float) -> dict:
    engine = ssd_engine(llm, opts, k=k, budget=budget)
    warm_up(engine, prompts[0], temperature)
    recorder = RoundRecorder(engine)
    try:
        run_prompts(engine, prompts, opts, temperature)
    finally:
        engine.close()
    return recorder.summary()


def predict(inputs: dict, ar_s_per_token: float, verify_s: float | None) -> dict:
    """tokens per verification (the theorem) and the speedup over AR it implies."""
    if None in (inputs["p_hit"], inputs["t_primary"], verify_s):
        return {"tokens_per_verification": None, "speedup_vs_ar": None}
    per_verify = ssd_speedup(inputs["p_hit"], *observed_or_default(inputs))
    return {"tokens_per_verification": per_verify, "speedup_vs_ar": per_verify * ar_s_per_token / verify_s}


def observed_or_default(inputs: dict) -> tuple[float, float, float, float]:
    """tokens_hit, tokens_miss, t_primary, t_backup; a quantity never observed (no hit, or no miss,
    in a short run) has weight p_hit = 0 or 1 - p_hit = 0 in the model, so any default will do."""
    tokens_hit = inputs["tokens_hit"] if inputs["tokens_hit"] is not None else 1.0
    tokens_miss = inputs["tokens_miss"] if inputs["tokens_miss"] is not None else 1.0
    t_backup = inputs["t_backup"] if inputs["t_backup"] is not None else 0.0
    return tokens_hit, tokens_miss, inputs["t_primary"], t_backup


def run(llm, opts: AnalysisOptions) -> dict:
    prompts = chat_prompts(llm, opts)
    ar_engine = llm.make_engine("ar")
    points = []
    for k, f, t in itertools.product(opts.ks, opts.fanout_sizes, opts.temperatures):
        budget = f * (k + 1)
        inputs = model_inputs(llm, opts, prompts, k, budget, t)
        engine = timed_engine(llm, opts, k=k, budget=budget)
        try:
            ar, timed = interleaved({"ar": ar_engine, "ssd": engine}, prompts, opts, t).values()
        finally:
            engine.close()
        verify_s = timed["verify_s"] / timed["rounds"] if timed.get("rounds") else None
        ar_s_per_token = ar["wall_s"] / ar["tokens"]
        points.append({
            "k": k, "f": f, "budget": budget, "temperature": t, "inputs": inputs,
            "ar_tokens_per_s": ar["tokens_per_s"], "ssd_tokens_per_s": timed["tokens_per_s"],
            "verify_s_per_round": verify_s, "ar_s_per_token": ar_s_per_token,
            "cache_hit_rate": timed.get("cache_hit_rate"), "mean_accepted": timed.get("mean_accepted"),
            "draft_hidden_fraction": timed.get("draft_hidden_fraction"),
            "measured_speedup_vs_ar": timed["tokens_per_s"] / ar["tokens_per_s"],
            "predicted": predict(inputs, ar_s_per_token, verify_s),
        })
    data = {"worker": opts.worker, "points": points}
    return write_outputs(NAME, data, plot(data), opts) | {"data": data}


def plot(data: dict):
    """Colour = temperature, marker = (K, F); the dashed diagonal is a perfect prediction."""
    from matplotlib.lines import Line2D

    fig, ax = new_figure(7.5, 5.5)
    shown = [p for p in data["points"] if p["predicted"]["speedup_vs_ar"] is not None]
    temps = sorted({p["temperature"] for p in shown})
    shapes = sorted({(p["k"], p["f"]) for p in shown})
    colors = {t: f"C{i}" for i, t in enumerate(temps)}
    markers = dict(zip(shapes, "osD^vP*X"))
    for p in shown:
        ax.scatter(p["predicted"]["speedup_vs_ar"], p["measured_speedup_vs_ar"], color=colors[p["temperature"]],
                   marker=markers[(p["k"], p["f"])], s=40)
    values = [v for p in shown for v in (p["predicted"]["speedup_vs_ar"], p["measured_speedup_vs_ar"])]
    if values:
        lo, hi = 0.9 * min(values), 1.1 * max(values)
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
    handles = [Line2D([], [], color=colors[t], marker="o", ls="", label=f"T = {t}") for t in temps]
    handles += [Line2D([], [], color="gray", marker=markers[kf], ls="", label=f"K = {kf[0]}, F = {kf[1]}")
                for kf in shapes]
    handles.append(Line2D([], [], color="k", ls="--", label="measured = predicted"))
    ax.legend(handles=handles, fontsize=8, loc="upper left")
    ax.set_xlabel("predicted SSD speedup over AR (Theorem 7, x)")
    ax.set_ylabel("measured SSD speedup over AR (x)")
    where = "draft worker" if data["worker"] else "in-process drafter"
    ax.set_title(f"Theorem 7: predicted vs measured ({where}); F = branches per position", fontsize=9)
    return fig
