"""(b) Saguaro sampling: acceptance rate, cache hit rate and end-to-end speed as C sweeps 0..1.

sigma_{F,C} scales the draft's top-F tokens by C before it samples, which lowers acceptance but
steers the target's residual (what it emits on a rejection) onto the tokens the tree pre-drafted,
raising the hit rate. C only acts on sampled rows, so the sweep runs at --temperature, or at 1.0
when that is 0. Each C is one run of the worker engine (tokens/s is the point); the rates come
from the same run.
"""

from __future__ import annotations

from saguaro.analyses.common import AnalysisOptions, chat_prompts, fanout_of, run_prompts, timed_engine, write_outputs
from saguaro.bench_plot import new_figure

NAME = "c_sweep"


def run(llm, opts: AnalysisOptions) -> dict:
    temperature = opts.temperature or 1.0
    prompts = chat_prompts(llm, opts)
    points = []
    for c in opts.c_values:
        engine = timed_engine(llm, opts, c=c)
        try:
            summary = run_prompts(engine, prompts, opts, temperature, warmup=True)
        finally:
            engine.close()
        points.append({"c": c, "fanout": fanout_of(engine), **{key: summary.get(key) for key in (
            "acceptance_rate", "cache_hit_rate", "mean_accepted", "tokens_per_round", "tokens_per_s",
            "ms_per_token_median", "tokens")}})
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
    right.plot(cs, [p["tokens_per_s"] for p in data["points"]], marker="s", color="tab:green", label="SSD")
    right.set_xlabel("Saguaro sampling C (1 = plain sampling)")
    right.set_ylabel("decode throughput (tokens/s)")
    right.set_ylim(bottom=0)
    right.legend(fontsize=8)
    where = "draft worker" if data["worker"] else "in-process drafter"
    right.set_title(f"end-to-end speed vs C ({where})", fontsize=9)
    return fig
