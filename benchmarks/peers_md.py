"""The fast-forward section of docs/results.md: saguaro AR (compiled and eager, float32 and bfloat16)
against llama.cpp on the embedded GGUF (its own Q4_1 and an F32 copy) and transformers, 1 and 2
threads, with each precision's bandwidth floor; a table and a plot, read from the JSON files of one
`benchmarks/record_peers.sh` run.
"""

from __future__ import annotations

import json
from pathlib import Path

FILES = {  # file stem -> how our rows in it ran
    "peers_f32": "float32, compiled",
    "peers_bf16": "bfloat16 x file's Q4_1/Q8_0 blocks, compiled (default)",
    "peers_bf16_dense": "bfloat16 x dense weights, compiled",
    "peers_bf16_eager": "bfloat16 x file's blocks, eager",
    "peers_int8": "int8 activations x file's blocks (--weights file-int8), compiled",
}
PEERS = {"llamacpp": "llama.cpp Q4_1", "llamacpp-f32": "llama.cpp F32", "hf": "transformers float32"}


def _runs(results: Path) -> list[tuple[str, int, dict]]:
    out = []
    for stem, label in FILES.items():
        for threads in (1, 2):
            path = results / f"{stem}_{threads}t.json"
            if path.is_file():
                out.append((label, threads, json.loads(path.read_text())))
    return out


def decode_rows(results: Path) -> list[dict]:
    """One row per (engine, threads): decode tokens/s (after the first token) averaged over datasets."""
    rows: dict[tuple[str, int], list[float]] = {}
    for label, threads, data in _runs(results):
        for res in data["results"].values():
            for mode, r in res.items():
                rate = r.get("decode_tokens_per_s")
                if rate is None:
                    continue
                name = f"saguaro AR ({label})" if mode == "ar" else PEERS.get(mode, mode)
                rows.setdefault((name, threads), []).append(rate)
    return [{"engine": name, "threads": t, "decode_tok_s": sum(v) / len(v)} for (name, t), v in rows.items()]


def peers_section(results: Path) -> list[str]:
    runs = _runs(results)
    if not runs:
        return ["_not recorded_"]
    lines = ["`bash benchmarks/record_peers.sh` (greedy, 2 prompts per dataset, 64 tokens each; every file ran "
             "its modes interleaved). Decode tokens/s counts the tokens after each prompt's first one over the "
             "time after it (prefill aside); request tokens/s includes the prefill. Ratios are within one file.",
             "", "| our rows | threads | dataset | saguaro AR decode tok/s | peer | peer decode tok/s | "
             "AR / peer (decode) | AR / peer (whole request) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, threads, data in runs:
        for dataset, res in data["results"].items():
            ar = res["ar"]
            for mode, peer in res.items():
                if mode == "ar":
                    continue
                ours, theirs = ar.get("decode_tokens_per_s"), peer.get("decode_tokens_per_s")
                decode_ratio = f"{ours / theirs:.2f}" if ours and theirs else "-"
                theirs_s = f"{theirs:.1f}" if theirs else "-"
                lines.append(f"| {label} | {threads} | {dataset} | {ours:.1f} | {PEERS.get(mode, mode)} | {theirs_s} | "
                             f"{decode_ratio} | {ar['tokens_per_s'] / peer['tokens_per_s']:.2f} |")
    bw = results / "bandwidth.json"
    if bw.is_file():
        lines += ["", "Bandwidth floor (`python benchmarks/bandwidth.py`: a sum over 1 GiB; one token reads every "
                  "weight once):", "", "| threads | read GB/s | precision | weights MB | floor ms/token | "
                  "floor tok/s |", "| --- | --- | --- | --- | --- | --- |"]
        for r in json.loads(bw.read_text())["rows"]:
            lines.append(f"| {r['threads']} | {r['gb_per_s']:.1f} | {r['precision']} | {r['weight_mb']:.0f} | "
                         f"{r['floor_ms_per_token']:.1f} | {1000 / r['floor_ms_per_token']:.0f} |")
    lines += ["", "![decode tokens/s per engine](results/peers.png)"] + block_linear_lines(results)
    return lines + int8_lines(results)


def int8_lines(results: Path) -> list[str]:
    """The int8-activation path (`--weights file-int8`) against the default's bfloat16 activations: the
    compiled step at 1 and 5 tokens, and what the activations' quantization costs in quality."""
    runs = [json.loads(p.read_text()) for p in sorted(results.glob("forward_paths_int8_*t.json"))]
    quality = results / "activation_quality.json"
    if not runs:
        return []
    lines = ["", "### Int8 activations (`--weights file-int8`)", "",
             "The file's blocks multiplied with the activations quantized to int8 per block of 32, as llama.cpp "
             "does (`csrc/int8_block_linear.cpp`, VPDPBUSD), against the default's bfloat16 activations: the "
             "compiled step of the embedded target, KV cache of 300 tokens, the two paths taking turns call by call "
             f"(`{runs[0]['meta']['command'].replace('--threads 1', '--threads N')}`).", "",
             "| threads | activations | 1 token ms | 5 tokens ms | 5 tokens / 1 token | 1 token x default | "
             "5 tokens x default |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for run in runs:
        rows = {r["weights"]: r for r in run["rows"]}
        base = rows.get("file")
        for name, label in (("file", "bfloat16 (default)"), ("file-int8", "int8")):
            r = rows.get(name)
            if r is None or base is None:
                continue
            lines.append(f"| {r['threads']} | {label} | {r['compiled_1_ms']:.2f} | {r['compiled_5_ms']:.2f} | "
                         f"{r['compiled_5_ms'] / r['compiled_1_ms']:.2f} | "
                         f"{base['compiled_1_ms'] / r['compiled_1_ms']:.2f} | "
                         f"{base['compiled_5_ms'] / r['compiled_5_ms']:.2f} |")
    if quality.is_file():
        q = json.loads(quality.read_text())
        lines += ["", f"What it costs (`{q['meta']['command']}`): held-out prompts scored by teacher forcing, every "
                  "position's next-token distribution against float32 over the same dequantized weights (so only "
                  "the arithmetic differs, not the weights).", "",
                  "| dataset | path | positions | top-1 agreement with float32 | mean KL divergence from float32 | "
                  "perplexity |", "| --- | --- | --- | --- | --- | --- |"]
        for r in q["rows"]:
            lines.append(f"| {r['dataset']} | {r['path']} | {r['positions']} | {r['top1_agreement']:.4f} | "
                         f"{r['mean_kl']:.5f} | {r['perplexity']:.3f} |")
    return lines


def block_linear_lines(results: Path) -> list[str]:
    """Every linear of the target over the GGUF's own blocks against dense bfloat16, per row count."""
    runs = [json.loads(p.read_text()) for p in sorted(results.glob("block_linear_*t.json"))]
    if not runs:
        return []
    lines = ["", "All the target's linears and its head, one call each (`python benchmarks/block_linear.py "
             "--threads N`): over the file's own Q4_1/Q8_0 blocks (`csrc/block_linear.cpp`, "
             f"{runs[0]['block_mb']:.0f} MB read) against dense bfloat16 ({runs[0]['bf16_mb']:.0f} MB; our packed "
             "kernel up to 16 rows, oneDNN above).", "",
             "| threads | rows | file blocks ms | dense bf16 ms | dense / blocks |", "| --- | --- | --- | --- | --- |"]
    for run in runs:
        for r in run["rows"]:
            lines.append(f"| {run['threads']} | {r['rows']} | {r['file_blocks_ms']:.2f} | {r['bf16_ms']:.2f} | "
                         f"{r['bf16_ms'] / r['file_blocks_ms']:.2f} |")
    return lines


def plot_peers(results: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = decode_rows(results)
    if not rows:
        return
    engines = sorted({r["engine"] for r in rows})
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(engines) + 1.5))
    for i, threads in enumerate((1, 2)):
        values = [next((r["decode_tok_s"] for r in rows if r["engine"] == e and r["threads"] == threads), 0)
                  for e in engines]
        ax.barh([j + 0.4 * i for j in range(len(engines))], values, height=0.4, label=f"{threads} thread(s)")
    ax.set_yticks([j + 0.2 for j in range(len(engines))], engines)
    ax.set_xlabel("decode tokens/s (greedy, b=1, embedded SmolLM2-135M)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
