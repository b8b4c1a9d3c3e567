"""The paper's analyses on our target/draft pair, each writing NAME.json and NAME.png:

(a) hit-vs-fanout   cache hit rate vs fan-out per position, fitted power law 1 - p_hit = F^-r
(b) c-sweep         Saguaro sampling C from 0 to 1: acceptance, hit rate, tokens/s
(c) fallback-batch  speed vs batch size for the neural and n-gram backups, b* marked
(d) theorem7        predicted vs measured SSD speedup across K, F and temperature
(e) fanout-shape    geometric vs uniform fan-out at several temperatures

Run with `saguaro bench --analysis NAME` (or `all`); modules load only when asked for.
"""

from __future__ import annotations

import argparse
import importlib
import logging

log = logging.getLogger(__name__)

ANALYSES = {  # command-line name -> module
    "hit-vs-fanout": "hit_vs_fanout",
    "c-sweep": "c_sweep",
    "fallback-batch": "fallback_batch",
    "theorem7": "theorem7",
    "fanout-shape": "fanout_shape",
}
ALIASES = dict(zip("abcde", ANALYSES))


def resolve(names: str) -> list[str]:
    """'a,theorem7' -> ['hit-vs-fanout', 'theorem7']; 'all' -> every analysis."""
    out = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name == "all":
            out += [n for n in ANALYSES if n not in out]
            continue
        name = ALIASES.get(name, name)
        if name not in ANALYSES:
            raise ValueError(f"unknown analysis {name!r}; choose from {', '.join(ANALYSES)}, a-e or all")
        out.append(name)
    return out


def run_analysis(name: str, llm, opts) -> dict:
    module = importlib.import_module(f"saguaro.analyses.{ANALYSES[name]}")
    log.info("analysis %s", name)
    return module.run(llm, opts)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_analysis_args(p: argparse.ArgumentParser) -> None:
    a = p.add_argument_group("analyses (--analysis)")
    a.add_argument("--analysis", help="run analyses instead of the mode comparison: "
                                      f"{', '.join(ANALYSES)} (or a-e), comma-separated, or all")
    a.add_argument("--out-dir", default="bench-analyses", help="where NAME.json and NAME.png go")
    a.add_argument("--max-fanout", type=int, default=16, help="(a) widest fan-out per position")
    a.add_argument("--c-values", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0], help="(b) C values")
    a.add_argument("--batch-sizes", type=_ints, default=[1, 2, 4, 8], help="(c) batch sizes")
    a.add_argument("--ks", type=_ints, default=[2, 4], help="(d) lookaheads K")
    a.add_argument("--fanout-sizes", type=_ints, default=[1, 3], help="(d) branches per position F (budget F(K+1))")
    a.add_argument("--temperatures", type=_floats, default=[0.0, 0.7, 1.0], help="(d), (e) temperatures")


def options_from_args(args, ssd):
    """AnalysisOptions from `saguaro bench` arguments (ssd: the validated SSD options)."""
    from pathlib import Path

    from saguaro.analyses.common import AnalysisOptions

    if not all(0 <= c <= 1 for c in args.c_values):
        raise ValueError(f"--c-values must lie in [0, 1], got {args.c_values}")
    if any(v < 1 for v in args.batch_sizes + args.ks + args.fanout_sizes) or args.max_fanout < 1:
        raise ValueError("--batch-sizes, --ks, --fanout-sizes and --max-fanout must be >= 1")
    if any(t < 0 for t in args.temperatures):
        raise ValueError(f"--temperatures must be >= 0, got {args.temperatures}")
    return AnalysisOptions(
        out_dir=Path(args.out_dir), datasets=args.datasets.split(","), num_prompts=args.num_prompts,
        max_tokens=args.max_tokens, k=args.k, seed=args.seed, temperature=args.temperature, draft=args.draft,
        worker=ssd.worker, fanout_budget=ssd.fanout_budget, acceptance=ssd.acceptance, r=ssd.r,
        max_fanout=args.max_fanout, c_values=args.c_values, batch_sizes=args.batch_sizes, ks=args.ks,
        fanout_sizes=args.fanout_sizes, temperatures=args.temperatures,
    )
