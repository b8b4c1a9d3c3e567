"""The GGUF block linears of this tree against another commit's, interleaved in one process.

REV's `models/csrc/*block_linear.cpp` is built into a library whose ops live under another namespace
(`-Dsaguaro_cpu=saguaro_rev`), so both kernels load side by side. Every linear of the embedded target
of one format runs per sweep, the two kernels taking turns sweep by sweep (drift hits both alike);
each row count reports the median sweep and whether the outputs are bitwise the same.

    python benchmarks/ab_kernels.py b90ecad --threads 1 --rows 1 3 5 8 --formats q4_1 q8_0 [--int8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from gguf import GGUFReader
from torch.utils import cpp_extension

from saguaro.bench import cpu_flags
from saguaro.embedded import embedded_target_path
from saguaro.loader import cache_root
from saguaro.models import cpu_kernels

RAW_BYTES = {"q4_1": 20, "q8_0": 34}


def build_rev(rev: str, source: str, workdir: Path) -> str:
    """REV's kernel `source` (and the header it includes) built as a library with ops under saguaro_rev."""
    for name in (source, "block_tiles.h"):
        text = subprocess.run(["git", "show", f"{rev}:src/saguaro/models/csrc/{name}"], capture_output=True,
                              text=True, check=True).stdout
        (workdir / name).write_text(text)
    library = workdir / "rev.so"
    libdir = Path(torch.__file__).parent / "lib"
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    subprocess.run(["g++", *cpu_kernels.FLAGS, abi, "-Dsaguaro_cpu=saguaro_rev",
                    *(f"-I{p}" for p in cpp_extension.include_paths()), str(workdir / source), "-o", str(library),
                    f"-L{libdir}", "-ltorch", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{libdir}"], check=True)
    torch.ops.load_library(str(library))
    return "saguaro_rev"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 5, 8])
    ap.add_argument("--formats", nargs="+", default=["q4_1"], choices=sorted(RAW_BYTES))
    ap.add_argument("--int8", action="store_true", help="the int8-activation kernels (int8_block_linear.cpp)")
    ap.add_argument("--sweeps", type=int, default=30)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    assert cpu_kernels.load(cache_root() / "kernels"), "needs saguaro's CPU kernels (AVX512_BF16)"
    suffix = cpu_kernels.INT8 if args.int8 else ""
    with tempfile.TemporaryDirectory() as tmp:
        theirs = getattr(torch.ops, build_rev(args.rev, "int8_block_linear.cpp" if args.int8 else "block_linear.cpp",
                                              Path(tmp)))
    ours = torch.ops.saguaro_cpu
    weights = []
    for t in GGUFReader(str(embedded_target_path())).tensors:
        fmt = t.tensor_type.name.lower()
        if len(t.shape) == 2 and fmt in args.formats:
            raw = torch.from_numpy(t.data.copy())
            weights.append((f"{fmt}{suffix}", getattr(ours, f"pack_{fmt}{suffix}")(raw), raw.shape[0],
                            raw.shape[1] // RAW_BYTES[fmt] * 32))
    packed = cpu_kernels.on_huge_pages([w[1] for w in weights])
    rows = []
    for m in args.rows:
        xs = {w[3]: torch.randn(m, w[3]).bfloat16() for w in weights}
        sides = [[getattr(ns, f"{w[0]}_linear") for w in weights] for ns in (theirs, ours)]
        outs = [[f(xs[w[3]], p, w[2]) for f, w, p in zip(fns, weights, packed)] for fns in sides]
        same = all(torch.equal(a, b) for a, b in zip(*outs))
        times: list[list[float]] = [[], []]
        for _ in range(args.sweeps):
            for fns, out in zip(sides, times):
                t0 = time.perf_counter()
                for f, w, p in zip(fns, weights, packed):
                    f(xs[w[3]], p, w[2])
                out.append(time.perf_counter() - t0)
        rev_ms, ours_ms = (1000 * sorted(t)[len(t) // 2] for t in times)
        rows.append({"rows": m, f"{args.rev}_ms": rev_ms, "this_tree_ms": ours_ms, "bitwise_same": same})
        print(f"{m} rows  {args.rev} {rev_ms:6.2f} ms  this tree {ours_ms:6.2f} ms  "
              f"{'bitwise the same' if same else 'OUTPUTS DIFFER'}", flush=True)
    if args.json:
        meta = {"command": "python benchmarks/ab_kernels.py " + " ".join(
            f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" if not isinstance(v, bool) else f"--{k}"
            for k, v in vars(args).items() if v not in (None, False) and k not in ("json", "rev")) + f" {args.rev}",
            "cpu": cpu_flags()}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
