"""Write docs/results.md from one recorded run (benchmarks/record_results.sh): every number in it is
read from the run's JSON files, none is typed by hand. The plots are drawn again from the same JSON.

    python benchmarks/results_md.py [--results docs/results] [--out docs/results.md]
"""

from __future__ import annotations

import argparse
import json
import re
from importlib.metadata import version
from pathlib import Path

from peers_md import peers_section, plot_peers

ANALYSES = ("hit_vs_fanout", "c_sweep", "fallback_batch", "theorem7", "fanout_shape")


def fmt(value, spec: str = ".2f") -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


# ----------------------------------------------------------------------------- sections

def machine_section(res: Path) -> str:
    lscpu = (res / "lscpu.txt").read_text() if (res / "lscpu.txt").is_file() else ""

    def field(name: str) -> str:
        m = re.search(rf"^{name}:\s*(.+)$", lscpu, re.M)
        return m.group(1).strip() if m else "?"

    load = {}
    for when in ("start", "end"):
        f = res / f"load_{when}.txt"
        if f.is_file():
            m = re.search(r"load average:\s*([\d.]+)", f.read_text())
            load[when] = m.group(1) if m else "?"
    cpus, per_core = field(r"CPU\(s\)"), field(r"Thread\(s\) per core")
    text = [
        f"- CPU: {field('Model name')} ({field('Vendor ID')}), {cpus} cores ({per_core} thread per core), "
        f"{field('Hypervisor vendor')} virtual machine",
        f"- torch {version('torch')} (CPU build), transformers {version('transformers')}, float32; the target runs "
        "with 1 torch thread in every mode (`--threads 1`); the SSD draft worker is a second process with 1 "
        "thread, pinned to the other core. Our float32 linear layers run through oneDNN with prepacked weights "
        "(`src/saguaro/models/linear.py`); transformers uses torch's default (MKL) matmul.",
        f"- Load: 1-minute load average {load.get('start', '?')} at the start of the run and "
        f"{load.get('end', '?')} at the end, on {cpus} cores. Absolute speeds depend on what else runs; ratios within "
        "one run are the fairer reading, since modes run interleaved prompt by prompt.",
    ]
    return "\n".join(text)


def per_round(row: dict, key: str) -> float | None:
    """Milliseconds of `key` (verify_s, draft_s) per round of a speculative mode."""
    return 1000 * row[key] / row["rounds"] if row.get("rounds") and key in row else None


def bench_section(report: dict) -> str:
    cfg = report["config"]
    out = [f"{cfg['num_prompts']} prompts per dataset x {cfg['max_tokens']} new tokens, temperature "
           f"{cfg['temperature']}, K = {cfg['k']}, batch size {cfg['batch_size']}, {cfg['threads']} torch thread(s). "
           "tok/s counts generated tokens over wall time (prefill included); ms/token is per request "
           "(median, min-max over prompts). verify / draft wait ms/round: the target's verification forward, and "
           "the time the engine waited for the next speculation (SD: drafting it; SSD: a cache hit's answer or a "
           "miss's fallback). `same` = greedy output identical to AR on every prompt (n/N prompts).",
           ""]
    header = ["dataset", "mode", "tok/s", "ms/token median (min-max)", "accept rate", "mean acc. len",
              "cache hit", "draft hidden", "verify ms/round", "draft wait ms/round", "x AR", "x SD", "same"]
    rows = []
    for d, modes in report["results"].items():
        for m, r in modes.items():
            same = r.get("identical_to_ar")
            same_txt = "–" if same is None else f"{fmt(same)} ({r.get('identical_prompts')}/{r['prompts']})"
            rows.append([d, f"`{m}`", fmt(r["tokens_per_s"]),
                         f"{fmt(r['ms_per_token_median'], '.0f')} ({fmt(r['ms_per_token_min'], '.0f')}-"
                         f"{fmt(r['ms_per_token_max'], '.0f')})",
                         fmt(r.get("acceptance_rate")), fmt(r.get("mean_accepted")), fmt(r.get("cache_hit_rate")),
                         fmt(r.get("draft_hidden_fraction")), fmt(per_round(r, "verify_s"), ".0f"),
                         fmt(per_round(r, "draft_s"), ".0f"), fmt(r.get("speedup_vs_ar")),
                         fmt(r.get("speedup_vs_sd")), same_txt])
    out.append(table(header, rows))
    out.append("\n![tokens/s per mode and dataset](results/bench.png)")
    return "\n".join(out)


def hit_vs_fanout_section(d: dict) -> str:
    fs = d["fanouts"]
    show = [f for f in (1, 2, 4, 8, 16, 32) if f <= fs[-1]]
    header = ["position k", "lookups"] + [f"p_hit(F={f})" for f in show] + ["r (1-p = F^-r)", "a, r (1-p = a F^-r)"]
    rows = []
    items = list(d["positions"].items()) + [("all", d["pooled"])]
    for pos, p in items:
        if not p or not p.get("hit_rate"):
            continue
        fit = p.get("fit") or {}
        two = fit.get("two_param")
        rows.append([pos, str(p["lookups"])] + [fmt(p["hit_rate"][f - 1]) for f in show]
                    + [fmt(fit.get("r")), "–" if not two else f"{two['a']:.2f}, {two['r']:.2f}"])
    return (f"K = {d['k']}, T = {d['temperature']}, uniform fan-out of {fs[-1]} branches at every position "
            "(in-process drafter); p_hit(F) counts a lookup as a hit when the emitted token ranks below F among "
            "the pre-drafted candidates.\n\n" + table(header, rows) + "\n\n" + hit_vs_fanout_reading(d)
            + "\n\n![hit rate vs fan-out](results/analyses/hit_vs_fanout.png)")


def hit_vs_fanout_reading(d: dict) -> str:
    pooled = d["pooled"]
    if not pooled.get("hit_rate"):
        return ""
    hit, r = pooled["hit_rate"], (pooled.get("fit") or {}).get("r")
    sparse = [k for k, p in d["positions"].items() if p["lookups"] < 10]
    return (f"**Reading:** over {pooled['lookups']} lookups the hit rate rises from {hit[0]:.2f} with one branch "
            f"per position to {hit[-1]:.2f} with {d['fanouts'][-1]}; the pooled fit gives r = {fmt(r)}, i.e. each "
            f"doubling of the fan-out multiplies the miss rate by about {fmt(2 ** -r if r is not None else None)}."
            + (f" Positions k = {', '.join(sparse)} had fewer than 10 lookups each, so their fits are loose."
               if sparse else ""))


def c_sweep_section(d: dict) -> str:
    rows = [[fmt(p["c"]), fmt(p["acceptance_rate"]), fmt(p["cache_hit_rate"]), fmt(p["mean_accepted"]),
             fmt(p["tokens_per_s"]), ", ".join(fmt(v) for v in p.get("tokens_per_s_passes", []))]
            for p in d["points"]]
    where = "draft worker" if d["worker"] else "in-process drafter"
    return (f"T = {d['temperature']}, K = {d['k']}, {where}; two passes over C, the second in reverse order, "
            "tok/s pooled over both.\n\n"
            + table(["C", "acceptance rate", "cache hit rate", "mean acc. len", "tok/s", "tok/s per pass"], rows)
            + "\n\n" + c_sweep_reading(d) + "\n\n![Saguaro sampling C sweep](results/analyses/c_sweep.png)")


def c_sweep_reading(d: dict) -> str:
    pts = sorted(d["points"], key=lambda p: p["c"])
    lo, hi = pts[0], pts[-1]
    if lo is hi or None in (lo["acceptance_rate"], hi["acceptance_rate"], lo["cache_hit_rate"], hi["cache_hit_rate"]):
        return ""
    trade = lo["acceptance_rate"] < hi["acceptance_rate"] and lo["cache_hit_rate"] > hi["cache_hit_rate"]
    return (f"**Reading:** lowering C from {fmt(hi['c'])} to {fmt(lo['c'])} moved the acceptance rate from "
            f"{fmt(hi['acceptance_rate'])} to {fmt(lo['acceptance_rate'])} and the cache hit rate from "
            f"{fmt(hi['cache_hit_rate'])} to {fmt(lo['cache_hit_rate'])}"
            + (" — the trade the paper describes (fewer accepted tokens, more hits)" if trade else "")
            + f"; end to end, {fmt(hi['tokens_per_s'])} tok/s became {fmt(lo['tokens_per_s'])} tok/s.")


def fallback_section(d: dict) -> str:
    measured = d["measured"]
    batches = [r["batch"] for r in measured["neural"]]
    rows = [[str(b)] + [fmt(next(r["tokens_per_s"] for r in measured[k] if r["batch"] == b)) for k in measured]
            for b in batches]
    inputs = d.get("model_inputs") or {}
    inp = ", ".join(f"{k} = {fmt(v)}" for k, v in inputs.items()) or "not measured"
    return (f"K = {d['k']}, T = {d['temperature']}. Model inputs (measured in-process at batch 1, times in "
            f"verifications): {inp}. **b\\* = {fmt(d['b_star'], 'd') if d['b_star'] else 'none in range'}**.\n\n"
            + table(["batch size"] + [f"tok/s, {k} backup" for k in measured], rows)
            + "\n\n" + fallback_reading(d) + "\n\n![speed vs batch size](results/analyses/fallback_batch.png)")


def fallback_reading(d: dict) -> str:
    neural = {r["batch"]: r["tokens_per_s"] for r in d["measured"]["neural"]}
    ngram = {r["batch"]: r["tokens_per_s"] for r in d["measured"]["ngram"]}
    ngram_wins = [b for b in neural if ngram.get(b, 0) > neural[b]]
    measured = (f"measured, the n-gram backup was faster at batch sizes {', '.join(map(str, ngram_wins))}"
                if ngram_wins else "measured, the neural backup was faster at every batch size tried")
    b_star = d.get("b_star")
    model = (f"the model, fed the costs measured at batch 1, puts b* at {b_star}: the n-gram backup should win "
             f"from batch {b_star} on" if b_star else "the model finds no b* in range: the neural backup should win")
    agree = (b_star is None and not ngram_wins) or (b_star is not None and ngram_wins and min(ngram_wins) == b_star)
    return (f"**Reading:** {model}; {measured}. "
            + ("Model and measurement agree." if agree else
               "Model and measurement disagree here. We have not pinned down why; note that the model's inputs "
               "are in-process costs at batch 1, while the measurement runs the draft worker."))


def theorem7_section(d: dict) -> str:
    rows = []
    for p in d["points"]:
        i = p["inputs"]
        rows.append([str(p["k"]), str(p["f"]), fmt(p["temperature"], ".1f"), fmt(i["p_hit"]), fmt(i["tokens_hit"]),
                     fmt(i["tokens_miss"]), fmt(i["t_primary"]), fmt(i["t_backup"]),
                     fmt(p["verify_s_per_round"] / p["ar_s_per_token"] if p["verify_s_per_round"] else None),
                     fmt(p["predicted"]["speedup_vs_ar"]), fmt(p["measured_speedup_vs_ar"])])
    header = ["K", "F", "T", "p_hit", "tok/hit round", "tok/miss round", "t_primary", "t_backup",
              "verify / AR step", "predicted x AR", "measured x AR"]
    return ("Times in units of one verification; predicted = Theorem 7's tokens per verification x "
            "(AR time per token / verification time per round).\n\n" + table(header, rows)
            + "\n\n" + theorem7_reading(d) + "\n\n![Theorem 7 predicted vs measured](results/analyses/theorem7.png)")


def theorem7_reading(d: dict) -> str:
    pts = [p for p in d["points"] if p["predicted"]["speedup_vs_ar"] is not None]
    if not pts:
        return ""
    errors = [abs(p["predicted"]["speedup_vs_ar"] - p["measured_speedup_vs_ar"]) / p["measured_speedup_vs_ar"]
              for p in pts]
    above = sum(p["predicted"]["speedup_vs_ar"] > p["measured_speedup_vs_ar"] for p in pts)
    best = max(pts, key=lambda p: p["measured_speedup_vs_ar"])
    worst = pts[errors.index(max(errors))]
    slow_tree = ""
    if worst["inputs"]["t_primary"] > 1:
        slow_tree = (f" The worst prediction is K = {worst['k']}, F = {worst['f']}, T = {worst['temperature']}, where "
                     f"building the tree takes {worst['inputs']['t_primary']:.2f} verifications (our worker answers "
                     "the next outcome only after finishing its tree, so the model charges every round "
                     "max(1, t_primary) and a miss round t_backup on top).")
    return (f"**Reading:** with its inputs measured, Theorem 7 predicts the measured speedup to within "
            f"{100 * sum(errors) / len(errors):.0f}% on average ({100 * max(errors):.0f}% at worst); it predicts "
            f"more than was measured in {above} of {len(pts)} settings (it leaves out the engine's own overheads). "
            f"The fastest setting was K = {best['k']}, F = {best['f']}, T = {best['temperature']} at "
            f"{fmt(best['measured_speedup_vs_ar'])}x AR." + slow_tree)


def fanout_shape_section(d: dict) -> str:
    rows = [[fmt(p["temperature"], ".1f"), p["shape"], str(p["fanout"]), fmt(p["cache_hit_rate"]),
             fmt(p["mean_accepted"]), fmt(p["tokens_per_round"])] for p in d["points"]]
    return (f"K = {d['k']}, budget {d['budget']} branches, in-process drafter.\n\n"
            + table(["T", "shape", "fan-out F_0..F_K", "cache hit rate", "mean acc. len", "tokens/round"], rows)
            + "\n\n" + fanout_shape_reading(d)
            + "\n\n![geometric vs uniform fan-out](results/analyses/fanout_shape.png)")


def fanout_shape_reading(d: dict) -> str:
    hit = {(p["shape"], p["temperature"]): p["cache_hit_rate"] for p in d["points"]}
    temps = sorted({p["temperature"] for p in d["points"]})
    wins = [t for t in temps if (hit.get(("geometric", t)) or 0) > (hit.get(("uniform", t)) or 0)]
    return (f"**Reading:** the geometric fan-out had the higher cache hit rate at "
            f"{len(wins)} of {len(temps)} temperatures" + (f" (T = {', '.join(map(str, wins))})" if wins else "")
            + "; with the same budget it puts more branches where verification more often ends (early positions).")


def ssd_vs_sd_section(runs: dict[str, dict]) -> str:
    """benchmarks/ssd_vs_sd.py, one run per temperature: SSD against SD on the target's core and on both."""
    header = ["dataset", "T", "K", "AR tok/s", "SD 1 core", "SD 2 cores", "SSD", "SSD / SD 1 core",
              "SSD / SD 2 cores", "SSD / AR", "cache hit", "draft hidden", "ceiling over SD",
              "SSD no lookup", "its / SD 1 core", "its cache hit"]
    rows = []
    for run in runs.values():
        cfg = run["config"]
        for d, modes in run["results"].items():
            ar, sd1, sd2, ssd, plain = (modes.get(m, {}) for m in ("ar", "sd-1core", "sd-2core", "ssd",
                                                                   "ssd-no-lookup"))
            rows.append([d, fmt(cfg["temperature"], ".0f"), str(cfg["k"])] + [
                fmt(m.get("tokens_per_s"), ".1f") for m in (ar, sd1, sd2, ssd)] + [
                fmt(ssd.get(key)) for key in ("speedup_vs_sd_1core", "speedup_vs_sd_2core", "speedup_vs_ar",
                                              "cache_hit_rate", "draft_hidden_fraction", "ceiling_vs_sd_1core")] + [
                fmt(plain.get("tokens_per_s"), ".1f"), fmt(plain.get("speedup_vs_sd_1core")),
                fmt(plain.get("cache_hit_rate"))])
    return ("Every mode on the cores it would really get: AR and SD 2 cores use both cores for the target, "
            "SD 1 core drafts and verifies on one core (the paper's SD baseline, whose draft shares the target's "
            "hardware), SSD verifies on one core while its draft worker runs on the other. SSD serves greedy rows "
            "whose context repeats its last 3 tokens by prompt lookup ahead of its cache; SSD no lookup is the "
            "paper's mechanism alone, and the cache hit rate counts only rounds that consulted the cache. The "
            "ceiling is "
            "1 + draft time / verify time of SD 1 core: what removing the draft's time entirely would give.\n\n"
            + table(header, rows))


def ar_speed_section(d: dict) -> str:
    """benchmarks/ar_speed.py: our AR decode step against transformers' generate, and the bandwidth floor."""
    header = ["threads", "saguaro ms/token", "transformers ms/token", "speedup", "floor ms/token", "x floor"]
    rows = [[str(r["threads"]), fmt(r["saguaro_ms_per_token"], ".1f"), fmt(r["hf_ms_per_token"], ".1f"),
             fmt(r["speedup_vs_hf"]), fmt(r["floor_ms_per_token"], ".1f"), fmt(r["ratio_to_floor"])]
            for r in d["results"]]
    return (f"Greedy, {d['tokens']} new tokens, median of the runs; the floor is the time to read "
            f"{d['weight_bytes'] / 1e6:.0f} MB of weights once per token at the measured read bandwidth.\n\n"
            + table(header, rows))


def draft_agreement(res: Path) -> str:
    """'0.37 (humaneval) / 0.38 (sharegpt)' from the draft's recorded held-out evaluation."""
    info = read_json(res / "draft_eval.json") or {}
    parts = [f"{v['agreement']:.2f} ({name})" for name, v in info.get("eval", {}).items() if "agreement" in v]
    return " / ".join(parts) or "?"


def overlap_sentence(d: str, sd: dict, ssd: dict) -> str:
    """How SSD's verification and waiting compare with SD's on one dataset, in the words the numbers allow."""
    v_ssd, v_sd = per_round(ssd, "verify_s"), per_round(sd, "verify_s")
    w_ssd, w_sd = per_round(ssd, "draft_s"), per_round(sd, "draft_s")
    if None in (v_ssd, v_sd, w_ssd, w_sd):
        return f"on {d}: not measured"
    verdict = "slowed the target down" if v_ssd > 1.2 * v_sd else "did not slow the target down"
    return (f"on {d} a verification took {v_ssd:.0f} ms per round in SSD vs {v_sd:.0f} ms in SD (drafting beside "
            f"it {verdict}), and SSD waited {w_ssd:.0f} ms per round for its speculation where SD spent {w_sd:.0f} ms "
            f"drafting (draft hidden fraction {fmt(ssd.get('draft_hidden_fraction'))})")


def shortfall_section(report: dict | None, res: Path) -> str:
    """The honest paragraph, its numbers read from the run."""
    facts, overlap, cost, carried = [], [], [], []
    k = report["config"]["k"] if report else "?"
    for d, modes in (report or {}).get("results", {}).items():
        ar, sd, ssd, hfa = (modes.get(m) for m in ("ar", "sd", "ssd", "hf-assisted"))
        if ar and sd and sd.get("rounds"):
            step = 1000 / ar["tokens_per_s"]  # AR ms per generated token
            m = sd["mean_accepted"]
            cost.append(f"on {d} an SD round cost {per_round(sd, 'verify_s') / step:.1f} AR steps to verify and "
                        f"{per_round(sd, 'draft_s') / step:.1f} to draft, and yielded {m + 1:.2f} tokens (mean "
                        f"accepted length {m:.2f} of K = {k}, plus the target's own)")
        if sd and ssd:
            facts.append(f"on {d}, SSD ran at {fmt(ssd.get('speedup_vs_ar'))}x AR and "
                         f"{fmt(ssd.get('speedup_vs_sd'))}x SD, SD at {fmt(sd.get('speedup_vs_ar'))}x AR "
                         f"(acceptance rate {fmt(sd.get('acceptance_rate'))}), SSD's cache hit rate was "
                         f"{fmt(ssd.get('cache_hit_rate'))}"
                         + (f", and HF assisted generation ran at {fmt(hfa.get('speedup_vs_ar'))}x AR" if hfa else ""))
            overlap.append(overlap_sentence(d, sd, ssd))
            if ssd.get("speedup_vs_sd", 0) > 1:
                carried.append(f"{d} ({fmt(ssd['speedup_vs_sd'])}x)")
    beat_ar = [m["ssd"]["speedup_vs_ar"] for m in (report or {}).get("results", {}).values()
               if m.get("ssd", {}).get("speedup_vs_ar", 0) > 1]
    exact = all(r.get("identical_to_ar") for modes in (report or {}).get("results", {}).values()
                for m, r in modes.items() if m in ("sd", "sd-ngram", "ssd"))
    lines = [
        "The paper's abstract reports Saguaro \"up to twice as fast as optimized speculative decoding baselines "
        "and up to 5x faster than autoregressive decoding with open source inference engines\". "
        + ("This run does not reproduce a speedup over autoregressive decoding" if not beat_ar else
           f"This run shows SSD at most {max(beat_ar):.2f}x AR, far from 5x")
        + ". What it measured, and the reasons we can name:",
        "",
        "- **Measured here:** " + ("; ".join(facts) if facts else "see the table above") + ".",
        f"- **A weak draft.** Our 2-layer distilled draft agrees with the 135M target's greedy token at a rate of "
        f"{draft_agreement(res)} on held-out prompts (its recorded evaluation). Speculation pays in proportion "
        "to accepted length, and SSD's cache can only hit when the verification outcome is among the few "
        "pre-drafted ones; with low acceptance, outcomes spread over many positions and tokens, so hit rates "
        "and accepted lengths stay low.",
        "- **A tiny target on a CPU.** Speculation's gains assume that verifying K+1 tokens costs about one AR "
        "step, as in memory-bound decoding of a large model on an accelerator, where the extra tokens ride on "
        "spare compute. Here " + ("; ".join(cost) if cost else "a verification costs more than an AR step")
        + ". Rounds that yield so few tokens barely pay for themselves; the Theorem 7 table in (d) puts the "
        "same kind of measured costs into the paper's model.",
        "- **Two cores.** SSD's gain comes from drafting in parallel with verification; here the draft worker has "
        "one core and the target the other: " + ("; ".join(overlap) if overlap else "not measured") + ". The "
        "remaining wait is the misses' fallback drafting and the messages between the two processes.",
        "- **Small samples.** A few prompts and tens of tokens per setting: rates have wide error bars, and the "
        "power-law and Theorem 7 fits are indicative only. Larger --num-prompts / --max-tokens narrow them.",
        "",
        "What does carry over: "
        + ("greedy outputs of SD and SSD were identical to AR on every prompt (exactness); " if exact else "")
        + ("SSD was faster than SD on " + " and ".join(carried) + ", the ordering the paper reports; "
           if carried else "")
        + "the `same` column shows how often transformers' greedy output matched ours.",
    ]
    return "\n".join(lines)


def build(res: Path) -> str:
    report = read_json(res / "bench.json")
    analyses = {name: read_json(res / "analyses" / f"{name}.json") for name in ANALYSES}
    script = Path(__file__).with_name("record_results.sh")
    commands = script.read_text().strip() if script.is_file() else "(benchmarks/record_results.sh)"
    parts = [
        "# Results",
        "",
        "Generated by `benchmarks/results_md.py` from the JSON files of one recorded run in `docs/results/` "
        "(`benchmarks/record_results.sh`); no number here is typed by hand, and the plots are drawn from the "
        "same JSON.",
        "",
        "## Machine",
        "",
        machine_section(res),
        "",
        "## Commands",
        "",
        "```bash\n" + commands + "\n```",
        "",
        "## AR, SD, SSD and transformers side by side",
        "",
        bench_section(report) if report else "_no bench.json_",
    ]
    titles = {
        "hit_vs_fanout": ("(a) Cache hit rate vs fan-out, power law", hit_vs_fanout_section),
        "c_sweep": ("(b) Saguaro sampling: sweeping C", c_sweep_section),
        "fallback_batch": ("(c) Fallback: speed vs batch size, b*", fallback_section),
        "theorem7": ("(d) Theorem 7: predicted vs measured speedup", theorem7_section),
        "fanout_shape": ("(e) Geometric vs uniform fan-out", fanout_shape_section),
    }
    for name, (title, section) in titles.items():
        parts += ["", f"## {title}", "", section(analyses[name]) if analyses[name] else "_not recorded_"]
    ssd_runs = {t: run for t in ("t0", "t1") if (run := read_json(res / f"ssd_vs_sd_{t}.json"))}
    parts += ["", "## SSD against SD on equal and on shared hardware", "",
              ssd_vs_sd_section(ssd_runs) if ssd_runs else "_not recorded_"]
    ar_speed = read_json(res / "ar_speed.json")
    parts += ["", "## AR against transformers", "", ar_speed_section(ar_speed) if ar_speed else "_not recorded_"]
    parts += ["", "## The fast forward against llama.cpp and transformers", ""] + peers_section(res)
    parts += ["", "## What falls short of the paper, and why", "", shortfall_section(report, res), ""]
    return "\n".join(parts)


def redraw_plots(res: Path) -> None:
    """Draw every PNG again from its JSON with the current plotting code (the numbers do not change)."""
    import importlib

    from saguaro.bench_plot import plot_bench, save_figure

    report = read_json(res / "bench.json")
    if report:
        plot_bench(report, str(res / "bench.png"))
    for name in ANALYSES:
        data = read_json(res / "analyses" / f"{name}.json")
        if data:
            figure = importlib.import_module(f"saguaro.analyses.{name}").plot(data)
            save_figure(figure, str(res / "analyses" / f"{name}.png"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default="docs/results", help="folder of the recorded run")
    p.add_argument("--out", default="docs/results.md")
    args = p.parse_args()
    redraw_plots(Path(args.results))
    plot_peers(Path(args.results), Path(args.results) / "peers.png")
    Path(args.out).write_text(build(Path(args.results)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
