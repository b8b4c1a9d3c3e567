"""(a) Cache hit rate vs fan-out F, per outcome position, with the paper's power law 1 - p_hit = F^-r.

One in-process SSD run with a uniform fan-out of F_max branches at every position records, for
each lookup, the rank of the token the target emitted among the candidates pre-drafted at that
position. A fan-out of F would have hit exactly when that rank is below F, so the run gives the
whole curve p_hit(F), F = 1..F_max, per position k = 0..K (k draft tokens accepted, then the
target's token; at k < K the draft's own token is excluded, as a rejection never emits it).

Fits (scipy curve_fit, least squares on the miss rate): the paper's one-parameter form
1 - p_hit = F^-r per position and pooled, and, as a diagnostic, the two-parameter a F^-r (the
one-parameter form forces a miss at F = 1, which a draft that is sometimes right does not show).
Beside them, `r_online`: what the engine's own fit (ssd.online.fit_power_law) makes of the same
lookups, so the JSON shows the r the online policy would use.
"""

from __future__ import annotations

import logging

import numpy as np
from matplotlib.ticker import FormatStrFormatter

from saguaro.analyses.common import AnalysisOptions, chat_prompts, run_prompts, ssd_engine, write_outputs
from saguaro.analyses.recorder import RoundRecorder
from saguaro.bench_plot import new_figure
from saguaro.ssd.online import fit_power_law

log = logging.getLogger(__name__)

NAME = "hit_vs_fanout"
MIN_LOOKUPS_TO_DRAW_FIT = 5  # the JSON has every fit; the plot skips those from a handful of lookups


def hit_curve(ranks: list[int | None], max_fanout: int) -> list[float]:
    """p_hit(F) for F = 1..max_fanout from the ranks of emitted tokens (None: beyond the candidates)."""
    n = len(ranks)
    return [sum(r is not None and r < f for r in ranks) / n for f in range(1, max_fanout + 1)]


def fit_miss_curve(fanouts: list[int], miss: list[float]) -> dict:
    """r of 1 - p_hit = F^-r, and (a, r) of 1 - p_hit = a F^-r; None where the data cannot say.

    Not the online policy's estimator on purpose: this one fits a whole measured curve (every F up to
    F_max, from one wide run) in the miss rate's own scale, for the plot; the policy's
    (ssd.online.fit_power_law) fits raw hit counts at the few fan-outs it ran, in log space, cheaply
    and without scipy. `online_r` gives the latter from the same ranks."""
    from scipy.optimize import curve_fit

    x, y = np.asarray(fanouts, float), np.asarray(miss, float)
    out = {"r": None, "two_param": None}
    if len(x) < 2 or not np.any(y > 0):
        return out
    try:
        (r,), _ = curve_fit(lambda f, r: f ** -r, x, y, p0=[0.5], bounds=(0.0, 20.0))
        out["r"] = float(r)
        (a, r2), _ = curve_fit(lambda f, a, r: a * f ** -r, x, y, p0=[max(y[0], 1e-3), 0.5],
                               bounds=([0.0, 0.0], [1.5, 20.0]))
        out["two_param"] = {"a": float(a), "r": float(r2)}
    except (RuntimeError, ValueError) as e:  # no convergence on a degenerate curve
        log.warning("power-law fit failed: %s", e)
    return out


def online_r(ranks: list[int | None], fanouts: list[int]) -> float | None:
    """The online policy's r from these lookups, as if each had been made at every fan-out F."""
    lookups = {f: len(ranks) for f in fanouts}
    hits = {f: sum(r is not None and r < f for r in ranks) for f in fanouts}
    return fit_power_law(lookups, hits)


def run(llm, opts: AnalysisOptions) -> dict:
    k, fmax = opts.k, opts.max_fanout
    engine = ssd_engine(llm, opts, budget=fmax * (k + 1), shape="uniform")
    recorder = RoundRecorder(engine)
    try:
        summary = run_prompts(engine, chat_prompts(llm, opts), opts, opts.temperature)
    finally:
        engine.close()
    fanouts = list(range(1, fmax + 1))
    positions = {}
    for pos in range(k + 1):
        ranks = [lk.rank for lk in recorder.lookups if lk.position == pos]
        if not ranks:
            continue
        hit = hit_curve(ranks, fmax)
        positions[str(pos)] = {"lookups": len(ranks), "hit_rate": hit,
                               "fit": fit_miss_curve(fanouts, [1 - h for h in hit]),
                               "r_online": online_r(ranks, fanouts)}
    all_ranks = [lk.rank for lk in recorder.lookups]
    pooled = hit_curve(all_ranks, fmax) if all_ranks else []
    data = {
        "temperature": opts.temperature, "k": k, "fanouts": fanouts, "positions": positions,
        "pooled": {"lookups": len(all_ranks), "hit_rate": pooled,
                   "fit": fit_miss_curve(fanouts, [1 - h for h in pooled]) if pooled else None,
                   "r_online": online_r(all_ranks, fanouts) if all_ranks else None},
        "run": summary,
    }
    return write_outputs(NAME, data, plot(data), opts) | {"data": data}


def plot(data: dict):
    fig, (left, right) = new_figure(11.0, 4.5, ncols=2)
    fs = np.asarray(data["fanouts"], float)
    series = [(f"k={pos} (n={p['lookups']})", p) for pos, p in data["positions"].items()]
    if data["pooled"]["hit_rate"]:
        series.append((f"all (n={data['pooled']['lookups']})", data["pooled"]))
    for label, p in series:
        hit = np.asarray(p["hit_rate"])
        line, = left.plot(fs, hit, marker="o", ms=3, label=label)
        miss = 1 - hit
        ok = miss > 0
        right.plot(fs[ok], miss[ok], "o", ms=3, color=line.get_color())
        r = (p.get("fit") or {}).get("r")
        if r is not None and p["lookups"] >= MIN_LOOKUPS_TO_DRAW_FIT:
            right.plot(fs, fs ** -r, "--", color=line.get_color(), label=f"{label}: r={r:.2f}")
    left.set_xlabel("fan-out F at the position (branches)")
    left.set_ylabel("cache hit rate p_hit (fraction of lookups)")
    left.set_ylim(0, 1)
    left.set_title(f"hit rate vs fan-out, K={data['k']}, T={data['temperature']}", fontsize=9)
    if series:
        left.legend(fontsize=7, title="outcome position")
    right.set_xscale("log", base=2)
    right.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    right.set_yscale("log")
    right.set_xlabel("fan-out F (branches, log scale)")
    right.set_ylabel("miss rate 1 - p_hit (log scale)")
    right.set_title(f"measured (dots), fitted 1 - p_hit = F^-r (dashed, n >= {MIN_LOOKUPS_TO_DRAW_FIT})", fontsize=9)
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=7)
    return fig
