"""Why `saguaro serve` ran the engine on its main thread: a torch kernel's cost by the thread that calls it.

libgomp (torch's OpenMP) lets a team's workers spin between parallel regions only while it counts no
more threads than cores; each thread that runs parallel kernels brings a team of its own. Once the
main thread has run a kernel (loading a model does), a second thread's kernels find more threads than
cores on a 2-core machine, and each one waits for its workers to wake from sleep.

    python benchmarks/openmp_threads.py     # 2-thread softmax, microseconds per call, in 3 layouts
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time

import torch


def per_call_us(calls: int) -> float:
    x = torch.randn(64, 1024)
    torch.softmax(x, -1)
    t0 = time.perf_counter()
    for _ in range(calls):
        torch.softmax(x, -1)
    return (time.perf_counter() - t0) / calls * 1e6


def layout(name: str, calls: int) -> float:
    """Time the kernel in one layout (run in a fresh process, as libgomp's count only grows)."""
    if name == "main":
        return per_call_us(calls)
    if name == "second-after-main":
        per_call_us(10)  # the main thread gets its team, as when it loads a model
    out = []
    t = threading.Thread(target=lambda: out.append(per_call_us(calls)))
    t.start()
    t.join()
    return out[0]


LAYOUTS = {"main": "the main thread, alone",
           "second-alone": "a second thread; the main thread ran no kernel",
           "second-after-main": "a second thread after the main thread ran kernels"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--layout", choices=LAYOUTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.layout:
        print(layout(args.layout, args.calls))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, what in LAYOUTS.items():
        out = subprocess.run([sys.executable, __file__, "--layout", name, "--calls", str(args.calls)],
                             capture_output=True, text=True, check=True).stdout
        print(f"{float(out):8.1f} us per softmax: {what}")


if __name__ == "__main__":
    main()
