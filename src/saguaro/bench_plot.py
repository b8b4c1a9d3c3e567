"""The `saguaro bench --plot` chart: tokens/s per mode per dataset, bars labelled with speedups."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def new_figure(width: float = 8.0, height: float = 4.5, ncols: int = 1):
    """A matplotlib figure drawn off-screen (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width, height), constrained_layout=True)


def save_figure(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)
    log.info("wrote %s", path)


def plot_bench(report: dict, path: str) -> None:
    """Grouped bars: datasets on x, one bar per mode; each bar says its speedup vs AR."""
    results, cfg = report["results"], report["config"]
    datasets, modes = list(results), list(cfg["modes"])
    fig, ax = new_figure(max(7.0, 3.0 + 0.5 * len(datasets) * len(modes)))
    width = 0.8 / len(modes)
    for j, mode in enumerate(modes):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(datasets))]
        ys = [results[d][mode]["tokens_per_s"] for d in datasets]
        bars = ax.bar(xs, ys, width, label=mode)
        for bar, d in zip(bars, datasets):
            ratio = results[d][mode].get("speedup_vs_ar")
            if ratio is not None:
                ax.annotate(f"{ratio:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(datasets)), datasets)
    ax.set_xlabel("prompt set")
    ax.set_ylabel("throughput (generated tokens/s, prefill included)")
    ax.set_title(f"saguaro bench: {cfg['num_prompts']} prompts x {cfg['max_tokens']} tokens, "
                 f"T={cfg['temperature']}, K={cfg['k']}, batch {cfg.get('batch_size', 1)} "
                 f"(labels: speedup vs ar)", fontsize=9)
    ax.legend(title="mode", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.margins(y=0.15)
    save_figure(fig, path)
