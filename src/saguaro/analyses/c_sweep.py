"""(b) Saguaro sampling: acceptance rate, cache hit rate and end-to-end speed as C sweeps 0..1.

sigma_{F,C} scales the draft's top-F tokens by C before it samples, which lowers acceptance but
steers the target's residual (what it emits on a rejection) onto the tokens the tree pre-drafted,
raising the hit rate. C only acts on sampled rows, so the sweep runs at --temperature, or at 1.0
when that is 0. Each C is run on the worker engine (tokens/s is the point), twice (see `run`);
the rates come from the same runs.
"""

from __future__ import annotations

from saguaro.analyses.common import (AnalysisOptions, chat_prompts, fanout_of, run_prompts, timed_engine, warm_up,
                                     write_outputs)
from saguaro.bench_plot import new_figure

NAME = "c_sweep"


def measure(llm, opts: AnalysisOptions, prompts, c: float, temperature: float) -> tuple[dict, list[int] | None]:
    engine = timed_engine(llm, opts, c=c)
    try:
        warm_up(engine, prompts[0], temperature)
        return run_prompts(engine, prompts, opts, temperature), fanout_of(engine)
    finally:
        engine.close()


def run(llm, opts: AnalysisOptions) -> dict:
    """Two passes over the C values, the second in reverse order, so a slow drift of the machine's
    speed does not tilt the curve; tokens/s pools both passes (the seeded rates repeat exactly)."""
    temperature = opts.temperature or 1.0
    prompts = chat_prompts(llm, opts)
    runs = {c: [] for c in opts.c_values}
    for c in list(opts.c_values) + list(reversed(opts.c_values)):
        runs[c].append(measure(llm, opts, prompts, c, temperature))
    points = []
    for c, passes in runs.items():
        (first, fanout), speeds = passes[0], [s["tokens_per_s"] for s, _ in passes]
        tokens, wall = sum(s["tokens"] for s, _ in passes), sum(s["wall_s"] for s, _ in passes)
        points.append({"c": c, "fanout": fanout, **{key: first.get(key) for key in (
            "acceptance_rate", "cache_hit_rate", "mean_accepted", "tokens_per_round", "tokens")},
            "tokens_per_s": tokens / wall, "tokens_per_s_passes": speeds})
    data = {"temperature": temperature, "k": opts.k, "worker": opts.worker, "points": points}
    return write_outputs(NAME, data, plot(data), opts) | {"data": data}


def plot(data: dict):
    fig, (left, right) = new_figure(10.0, 4.2, ncols=2)
    cs = [p["c"] for p in data["points"]]
    for key, label in (("acceptance_rate", "acceptance rate"), ("cache_hit_rate", "cache hit rate")):
        left.plot(cs, [p[key] if p[key] is not None else float("nan") for p in data["points"]], marker="o", label=label)
    left.set_xlabel("Saguaro sampling C (1 = plain sampling)")
    left.set_ylabel("rate (fraction)")
    left.set_ylim(0, 1)
    left.legend(fontsize=8)
    left.set_title(f"rates vs C, T={data['temperature']}, K={data['k']}", fontsize=9)
    right.plot(cs, [p["tokens_per_s"] for p in data["points"]], marker="s", color="tab:green",
               label="SSD (both passes pooled)")
    for j in range(max(len(p.get("tokens_per_s_passes", [])) for p in data["points"])):
        right.plot(cs, [p["tokens_per_s_passes"][j] for p in data["points"]], ls="", marker="x", color="gray",
                   label="one pass" if j == 0 else None)
    right.set_xlabel("Saguaro sampling C (1 = plain sampling)")
    right.set_ylabel("throughput (generated tokens/s)")
    right.set_ylim(bottom=0)
    right.legend(fontsize=8)
    where = "draft worker" if data["worker"] else "in-process drafter"
    right.set_title(f"end-to-end speed vs C ({where})", fontsize=9)
    return fig
