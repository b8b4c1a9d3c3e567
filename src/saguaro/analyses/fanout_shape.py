"""(e) Geometric vs uniform fan-out at T = 0, 0.7, 1.0 (--temperatures).

The same branch budget (--fanout-budget, default 3(K+1)) spread evenly over the K+1 outcome
positions, or geometrically (more branches where the verification is likelier to end, from the
priors --acceptance and --power-r). In-process runs (rates are the point): cache hit rate, mean
accepted length and tokens per round, per shape and temperature.
"""

from __future__ import annotations

from saguaro.analyses.common import AnalysisOptions, chat_prompts, fanout_of, run_prompts, ssd_engine, write_outputs
from saguaro.bench_plot import new_figure

NAME = "fanout_shape"
SHAPES = ("geometric", "uniform")


def run(llm, opts: AnalysisOptions) -> dict:
    prompts = chat_prompts(llm, opts)
    points = []
    for t in opts.temperatures:
        for shape in SHAPES:
            engine = ssd_engine(llm, opts, shape=shape)
            try:
                summary = run_prompts(engine, prompts, opts, t)
            finally:
                engine.close()
            points.append({"temperature": t, "shape": shape, "fanout": fanout_of(engine),
                           **{key: summary.get(key) for key in ("cache_hit_rate", "acceptance_rate", "mean_accepted",
                                                                 "tokens_per_round", "tokens_per_s", "tokens")}})
    data = {"k": opts.k, "budget": opts.fanout_budget or 3 * (opts.k + 1), "points": points}
    return write_outputs(NAME, data, plot(data), opts) | {"data": data}


def plot(data: dict):
    fig, axes = new_figure(10.0, 4.2, ncols=2)
    temps = sorted({p["temperature"] for p in data["points"]})
    width = 0.38
    panels = (("cache_hit_rate", "cache hit rate (fraction of lookups)"),
              ("tokens_per_round", "tokens per round (accepted + 1)"))
    for ax, (key, label) in zip(axes, panels):
        for j, shape in enumerate(SHAPES):
            pts = {p["temperature"]: p for p in data["points"] if p["shape"] == shape}
            fanout = next(iter(pts.values()))["fanout"] if pts else None
            ys = [pts[t][key] if t in pts and pts[t][key] is not None else 0.0 for t in temps]
            xs = [i + (j - 0.5) * width for i in range(len(temps))]
            bars = ax.bar(xs, ys, width, label=f"{shape} {fanout}")
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(range(len(temps)), [f"T = {t}" for t in temps])
        ax.set_xlabel("sampling temperature")
        ax.set_ylabel(label)
        ax.legend(fontsize=7, title="fan-out F_0..F_K")
        ax.margins(y=0.15)
    axes[0].set_ylim(0, 1.1)
    axes[0].set_title(f"hit rate by fan-out shape, K={data['k']}, budget {data['budget']}", fontsize=9)
    axes[1].set_title("tokens per verification round", fontsize=9)
    return fig
