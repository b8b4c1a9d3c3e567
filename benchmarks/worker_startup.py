"""CPU time a draft worker spends loading before it can draft, each variant in a fresh process (as
a worker starts), one torch thread (as the engine pins it):

- whole-target: what the worker loaded before: the whole target and its tokenizer, then the draft;
- embeddings-alone: what it loads now: the draft on the target's embedding matrix, read alone;
- imports-only: the worker module's imports (torch and saguaro), the floor under both.

    .venv/bin/python benchmarks/worker_startup.py [--target T] [--draft D] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

PRELUDE = """
import resource, sys, time, json
import torch
torch.set_num_threads(1)
TARGET, DRAFT = sys.argv[1], sys.argv[2]
"""
REPORT = """
r = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"cpu_s": r.ru_utime + r.ru_stime, "max_rss_mb": r.ru_maxrss / 1024}))
"""
VARIANTS = {
    "whole-target": """
import saguaro.ssd.worker
from saguaro.loader import load_model, resolve_checkpoint
from saguaro.speculators.draft import load_draft
from saguaro.tokenizer import Tokenizer
target = load_model(TARGET)
tokenizer = Tokenizer.load(resolve_checkpoint(TARGET), target.config.eos_token_ids)
draft = load_draft(DRAFT, target, tokenizer)
""",
    "embeddings-alone": """
from saguaro.ssd.worker import load_worker_draft
draft, vocab = load_worker_draft(TARGET, DRAFT, torch.float32, "cpu")
""",
    "imports-only": """
import saguaro.ssd.worker
""",
}


def measure(variant: str, target: str, draft: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PRELUDE + VARIANTS[variant] + REPORT, target, draft],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from saguaro.embedded import embedded_draft_path, embedded_target_path

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=str(embedded_target_path()))
    p.add_argument("--draft", default=str(embedded_draft_path()))
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    for variant in VARIANTS:
        runs = [measure(variant, args.target, args.draft) for _ in range(args.repeat)]
        cpu = [r["cpu_s"] for r in runs]
        print(f"{variant:17s} CPU {statistics.median(cpu):5.2f} s (median of {len(cpu)}: "
              f"{', '.join(f'{c:.2f}' for c in cpu)}), max RSS {max(r['max_rss_mb'] for r in runs):.0f} MB")


if __name__ == "__main__":
    main()
