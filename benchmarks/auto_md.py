"""docs/auto.md (tables) and docs/results/serve_load.png (plot) from one `benchmarks/record_auto.sh` run.

    python benchmarks/auto_md.py [--results docs/results] [--out docs/auto.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def cpu_line(results: Path) -> str:
    text = (results / "lscpu_auto.txt").read_text() if (results / "lscpu_auto.txt").is_file() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("Flags")), [])
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    cpus = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("CPU(s)")), "?")
    return f"{model}, {cpus} CPUs, flags: {' '.join(shown) or 'none of avx2/avx512'}"


def serve_section(results: Path) -> list[str]:
    path = results / "serve_load.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    lines = ["## The server under concurrent clients", "",
             f"`{data['meta']['command']}`: each client streams one held-out ShareGPT chat request for "
             "96 tokens (official `openai` client), the two servers run one after the other (A B B A); "
             "tokens/s are summed over the clients' requests, and over the repeats.", "",
             "| clients | T | default tok/s | `--mode ar` tok/s | default / ar | default TTFT s | ar TTFT s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in data["table"]:
        lines.append(f"| {r['clients']} | {r['temperature']:g} | {r['default_tokens_per_s']:.1f} | "
                     f"{r['ar_tokens_per_s']:.1f} | {r['default_over_ar']:.2f} | {r['default_ttft_s']:.2f} | "
                     f"{r['ar_ttft_s']:.2f} |")
    plot(data["table"], results / "serve_load.png")
    return lines + ["", "![server tokens/s](results/serve_load.png)", ""]


def plot(table: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['clients']} clients\nT={r['temperature']:g}" for r in table]
    x = range(len(table))
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar([i - 0.2 for i in x], [r["default_tokens_per_s"] for r in table], 0.4, label="saguaro serve (auto)")
    ax.bar([i + 0.2 for i in x], [r["ar_tokens_per_s"] for r in table], 0.4, label="saguaro serve --mode ar")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("aggregate tokens/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def auto_section(results: Path) -> list[str]:
    files = sorted(results.glob("auto_t*.json"))
    if not files:
        return []
    runs = [(p.name, json.loads(p.read_text())) for p in files]
    order = {"auto_t0.json": 0, "auto_t0.7.json": 1, "auto_t1.json": 2, "auto_t0-again.json": 3}
    runs.sort(key=lambda run: order.get(run[0], 9))
    config = runs[0][1]["config"]
    modes = [m for m in ("sd-2core", "sd-2core-stop", "ssd") if m in runs[0][1]["results"]["humaneval"]]
    names = {"sd-2core": "SD K=4", "sd-2core-stop": "SD, stop where unsure", "ssd": "SSD"}
    lines = ["## b = 1: the default against AR, SD and SSD", "",
             f"`python benchmarks/ssd_vs_sd.py --k {config['k']} --num-prompts {config['num_prompts']} "
             f"--max-tokens {config['max_tokens']} --temperature T --modes {config['modes']}` (held-out chat "
             "prompts, modes interleaved prompt by prompt; AR, SD and auto have every core, SSD's target one "
             "and its worker the other; SD \"stop where unsure\" drafts past a token only where the draft's "
             "top probability was at least "
             f"{config.get('min_confidence', 0.8)}, as auto's SD does). The run starts with no remembered "
             "clocks (engine/auto_memory.py): the first T = 0 run pays the first use's measuring rounds, the "
             "later ones (and \"0, again\", the same command last) start from what the earlier processes "
             "measured.", "",
             "| T | dataset | AR tok/s | " + " | ".join(f"{names[m]} / AR" for m in modes)
             + " | auto / AR | speculative rounds within auto | same tokens as AR |",
             "| --- | --- | --- | " + " | ".join("---" for _ in modes) + " | --- | --- | --- |"]
    for name, data in runs:
        t = f"{data['config']['temperature']:g}" + (", again" if "again" in name else "")
        for dataset, res in data["results"].items():
            auto = res["auto"]
            same = auto.get("identical_to_ar", "-")
            ran = auto.get("rounds") or 0  # speculative rounds in the measured prompts
            cells = " | ".join(f"{res[m]['speedup_vs_ar']:.2f}" for m in modes)
            lines.append(f"| {t} | {dataset} | {res['ar']['tokens_per_s']:.1f} | {cells} | "
                         f"{auto['speedup_vs_ar']:.2f} | {ran} | {same} |")
    return lines + [""]


def draft_length_section(results: Path) -> list[str]:
    path = results / "draft_length_2t.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    meta = data["meta"]
    lines = ["## How long should the draft's proposals be", "",
             f"`{meta['command']}`: the target decodes held-out chat prompts greedily, the draft reads the same "
             "text, and SD rounds are replayed from its top probabilities and argmax agreement, with the "
             f"measured costs: a drafting step {meta['draft_cost']:.3f} of a target step, verification of "
             "2..K+1 tokens " + ", ".join(f"{v:.2f}" for v in meta["verify_cost"]) + " steps. Cells: tokens "
             "per unit of AR time (1.0 = AR), by K (rows) and min_confidence (columns; 0 = always K).", ""]
    for dataset, res in data["results"].items():
        table = res["x_ar"]
        taus = list(next(iter(table.values())))
        lines += [f"{dataset}, greedy agreement {res['agreement']:.3f}:", "",
                  "| K | " + " | ".join(taus) + " |", "| --- | " + " | ".join("---" for _ in taus) + " |"]
        lines += [f"| {k[2:]} | " + " | ".join(f"{v:.2f}" for v in row.values()) + " |" for k, row in table.items()]
        lines.append("")
    return lines


def forward_section(results: Path) -> list[str]:
    rows = []
    for path in sorted(results.glob("forward_paths_*.json")):
        rows += json.loads(path.read_text())["rows"]
    if not rows:
        return []
    lines = ["## The forward, per path", "",
             "`python benchmarks/forward_paths.py --threads N [--compile]`: embedded target, KV of 300 tokens, "
             "median ms per call.", "",
             "| dtype | weights | threads | eager 1 token | eager 5 tokens | compiled 1 token | compiled 5 tokens | "
             "5 / 1 compiled |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        one, five = r.get("compiled_1_ms"), r.get("compiled_5_ms")
        cells = f"{one:.1f} | {five:.1f} | {five / one:.2f}" if one and five else "- | - | -"
        weights = {"file": "GGUF blocks (Q4_1/Q8_0)", "file-int8": "GGUF blocks, int8 activations"}.get(
            r.get("weights"), "dense")
        lines.append(f"| {r['dtype']} | {weights} | {r['threads']} | {r['eager_1_ms']:.1f} | {r['eager_5_ms']:.1f} | "
                     f"{cells} |")
    return lines + [""]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def verification_section(results: Path) -> list[str]:
    """Compiled forward of 1..5 tokens at two commits, runs alternating (benchmarks/ab_forward.sh, or
    benchmarks/ab_run.sh over forward_paths.py for some token counts: the others show as -)."""
    files = [runs for path in sorted(results.glob("forward_ab_*t.jsonl")) if (runs := read_jsonl(path))]
    if not files:
        return []
    tokens = sorted({int(k.split("_")[1]) for runs in files for r in runs for k in r if k.startswith("compiled_")})
    lines = ["## Verification: T tokens per call against one", "",
             "`benchmarks/ab_forward.sh REV THREADS ROUNDS`: the compiled default forward (bfloat16 over the "
             "GGUF's blocks), KV of 300 tokens, at two commits, runs alternating; each cell is the median "
             "over runs of each run's median ms, and in brackets its ratio to one token.", "",
             "| threads | commit | runs | " + " | ".join(f"{t} token{'s' * (t > 1)}" for t in tokens) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in tokens) + " |"]
    for runs in files:
        for commit in dict.fromkeys(r["commit"] for r in runs):
            mine = [r for r in runs if r["commit"] == commit]
            ms = {t: statistics.median(r[f"compiled_{t}_ms"] for r in mine) for t in tokens
                  if f"compiled_{t}_ms" in mine[0]}
            lines.append(f"| {mine[0]['threads']} | {commit} | {len(mine)} | " + " | ".join(
                f"{ms[t]:.2f} ({ms[t] / ms[tokens[0]]:.2f})" if t in ms else "-" for t in tokens) + " |")
    return lines + [""]


def draft_after_target_section(results: Path) -> list[str]:
    """SD's draft step right after a target step and back to back, at two commits (ab_run.sh)."""
    runs = [run for path in sorted(results.glob("draft_after_target_*t.jsonl")) for run in read_jsonl(path)]
    if not runs:
        return []
    lines = ["## The draft step after a target step", "",
             "`benchmarks/ab_run.sh REV ROUNDS benchmarks/draft_after_target.py --threads N`: on the embedded pair "
             "as `--mode sd` loads it, a target step (1 and 5 tokens in turn, KV 300) then two draft steps; the "
             "first pays for what the target's sweep evicted, the second runs back to back. Medians over runs "
             "of each run's median ms.", "",
             "| threads | commit | runs | target step | draft step after it | draft step after a draft step |",
             "| --- | --- | --- | --- | --- | --- |"]
    for key in dict.fromkeys((r["threads"], r["commit"]) for r in runs):
        mine = [r for r in runs if (r["threads"], r["commit"]) == key]
        cells = [statistics.median(r[k] for r in mine)
                 for k in ("target_ms", "draft_after_target_ms", "draft_after_draft_ms")]
        lines.append(f"| {key[0]} | {key[1]} | {len(mine)} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="docs/results")
    ap.add_argument("--out", default="docs/auto.md")
    args = ap.parse_args()
    results = Path(args.results)
    lines = ["# mode auto and the forward: recorded runs", "",
             f"Generated by `benchmarks/auto_md.py` from the JSON that `benchmarks/record_auto.sh` writes; a section "
             "may be re-run alone with the command it shows (git log docs/results/ says when). "
             f"CPU: {cpu_line(results)}.",
             "Absolute numbers move ~10% between runs on this VM; read the ratios within a row.", ""]
    lines += serve_section(results) + auto_section(results) + draft_length_section(results)
    lines += verification_section(results) + draft_after_target_section(results)
    lines += forward_section(results)
    Path(args.out).write_text("\n".join(lines))


if __name__ == "__main__":
    main()
