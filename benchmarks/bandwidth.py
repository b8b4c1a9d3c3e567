"""Memory read bandwidth of this machine at 1 and 2 threads (a sum over 1 GiB, median of 5), and the
decode floor it sets: one token reads every weight once, so ms/token >= weight bytes / bandwidth.

    python benchmarks/bandwidth.py [--json docs/results/bandwidth.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from saguaro.embedded import embedded_target_path


def read_gb_per_s(threads: int, size_bytes: int = 1 << 30, repeats: int = 5) -> float:
    torch.set_num_threads(threads)
    x = torch.ones(size_bytes // 4, dtype=torch.float32)
    x.sum()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return size_bytes / statistics.median(times) / 1e9


def weight_bytes() -> dict[str, int]:
    """Bytes one decode step reads, per precision, for the embedded target (its head is the tied
    embedding, read whole; the GGUF's own Q4_1 file is read whole)."""
    from saguaro.loader import load_model

    model = load_model(embedded_target_path())
    params = sum(p.numel() for p in model.parameters())
    return {"float32": 4 * params, "bfloat16": 2 * params, "Q4_1 (GGUF file)": embedded_target_path().stat().st_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    args = ap.parse_args()
    sizes = weight_bytes()
    rows = []
    for threads in (1, 2):
        bw = read_gb_per_s(threads)
        for precision, nbytes in sizes.items():
            rows.append({"threads": threads, "gb_per_s": bw, "precision": precision, "weight_mb": nbytes / 1e6,
                         "floor_ms_per_token": 1000 * nbytes / (bw * 1e9)})
            print(json.dumps(rows[-1]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python benchmarks/bandwidth.py", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
