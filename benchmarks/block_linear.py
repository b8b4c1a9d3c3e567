"""Time every linear of the embedded target (and its tied head) in the GGUF file's own block formats
(Q4_1, Q8_0; `saguaro_cpu::q4_1_linear` / `q8_0_linear`) against the bfloat16 packed kernel, per row
count, with the bytes each reads per call and the bandwidth floor they imply.

    python benchmarks/block_linear.py --threads 1 --rows 1 5 8 32 256
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from gguf import GGUFReader, quants

from saguaro.embedded import embedded_target_path
from saguaro.loader import cache_root
from saguaro.models import cpu_kernels


def layers(path: Path):
    """(name, format, raw uint8 blocks, bf16 dense weight) of every 2-D tensor."""
    for t in GGUFReader(str(path)).tensors:
        if len(t.shape) != 2:
            continue
        raw = torch.from_numpy(t.data.copy())
        dense = torch.from_numpy(quants.dequantize(t.data, t.tensor_type)).reshape(raw.shape[0], -1).bfloat16()
        yield t.name, t.tensor_type.name.lower(), raw, dense


def timed(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - t0) / repeats)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 5, 8, 32, 256])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    assert cpu_kernels.load(cache_root() / "kernels"), "needs saguaro's CPU kernels (AVX512_BF16)"
    ops = torch.ops.saguaro_cpu
    weights = []
    for name, fmt, raw, dense in layers(embedded_target_path()):
        weights.append((name, fmt, getattr(ops, f"pack_{fmt}")(raw), cpu_kernels.pack_weight(dense), dense))
    block_bytes = sum(w[2].numel() for w in weights)
    dense_bytes = sum(w[4].numel() * 2 for w in weights)
    rows_out = []
    for rows in args.rows:
        xs = {w[4].shape[1]: torch.randn(rows, w[4].shape[1]).bfloat16() for w in weights}
        repeats = max(2, 64 // rows)

        def run_blocks():
            for name, fmt, packed, _, dense in weights:
                getattr(ops, f"{fmt}_linear")(xs[dense.shape[1]], packed, dense.shape[0])

        def run_bf16():
            for name, fmt, _, packed, dense in weights:
                if rows <= 16:
                    cpu_kernels.packed_linear(xs[dense.shape[1]], packed, dense.shape[0])
                else:
                    torch.nn.functional.linear(xs[dense.shape[1]], dense)

        blocks_ms, bf16_ms = timed(run_blocks, repeats) * 1e3, timed(run_bf16, repeats) * 1e3
        rows_out.append({"rows": rows, "file_blocks_ms": round(blocks_ms, 3), "bf16_ms": round(bf16_ms, 3)})
        print(f"{rows:4d} rows  file blocks {blocks_ms:7.2f} ms   bf16 {bf16_ms:7.2f} ms   "
              f"({'packed kernel' if rows <= 16 else 'oneDNN'})  ratio {bf16_ms / blocks_ms:.2f}x")
    print(f"bytes per pass: file blocks {block_bytes / 1e6:.1f} MB, bf16 {dense_bytes / 1e6:.1f} MB")
    if args.out:
        args.out.write_text(json.dumps({"threads": args.threads, "block_mb": block_bytes / 1e6,
                                        "bf16_mb": dense_bytes / 1e6, "rows": rows_out}, indent=2))


if __name__ == "__main__":
    main()
