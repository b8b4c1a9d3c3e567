"""What every analysis shares: its options, the prompts, SSD engines with a fixed policy, timed runs,
and writing NAME.json + NAME.png.

Engines: the in-process SSD engine (worker=False) is deterministic and cheap, so analyses use it
where the quantity is a rate (hits, acceptance, tokens per round); the worker engine is used where
the quantity is a speed (tokens/s), unless --no-worker asks for in-process runs everywhere. Every
SSD engine here keeps its fan-out and fallback fixed (no online refit), so each point of a sweep
measures the setting it names.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from saguaro.bench import EngineRunner, run_batch, summarize
from saguaro.engine.ssd_setup import available_cores
from saguaro.prompts import load_prompts
from saguaro.sampling import SamplingParams
from saguaro.ssd.online import PRIOR_ACCEPTANCE, PRIOR_R

log = logging.getLogger(__name__)


@dataclass
class AnalysisOptions:
    out_dir: Path
    datasets: list[str] = field(default_factory=lambda: ["humaneval", "sharegpt"])
    num_prompts: int = 2  # per dataset
    max_tokens: int = 32
    k: int = 4
    seed: int = 0
    temperature: float = 0.0
    draft: str | None = None
    worker: bool = True  # False (--no-worker): timed runs in-process as well
    fanout_budget: int = 0  # 0: 3(K+1)
    acceptance: float = PRIOR_ACCEPTANCE  # priors that shape the geometric fan-out
    r: float = PRIOR_R
    max_fanout: int = 16  # (a)
    c_values: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # (b)
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # (c)
    ks: list[int] = field(default_factory=lambda: [2, 4])  # (d)
    fanout_sizes: list[int] = field(default_factory=lambda: [1, 3])  # (d): budget = F (K+1)
    temperatures: list[float] = field(default_factory=lambda: [0.0, 0.7, 1.0])  # (d), (e)

    def as_json(self) -> dict:
        return {key: (str(v) if isinstance(v, Path) else v) for key, v in asdict(self).items()}


def chat_prompts(llm, opts: AnalysisOptions) -> list[list[int]]:
    """The first num_prompts held-out prompts of each dataset, chat template applied."""
    return [llm.tokenizer.encode_chat([{"role": "user", "content": p}])
            for d in opts.datasets for p in load_prompts(d, "eval")[: opts.num_prompts]]


def ssd_engine(llm, opts: AnalysisOptions, *, k: int | None = None, budget: int | None = None,
               shape: str = "geometric", c: float = 1.0, fallback: str = "neural", worker: bool = False,
               max_batch_size: int = 64):
    """An SSD engine with a fixed fan-out shape and fallback (the online fit is off), and no prompt
    lookup ahead of the cache: the analyses study the paper's mechanisms alone."""
    return llm.make_engine("ssd", opts.draft, k or opts.k, max_batch_size,
                           fanout_budget=opts.fanout_budget if budget is None else budget, fanout_shape=shape,
                           acceptance=opts.acceptance, r=opts.r, saguaro_c=c, fallback=fallback,
                           worker=worker, fit=False, prompt_lookup_min_match=0)


def fanout_of(engine) -> list[int] | None:
    policy = getattr(engine, "policy", None)
    return list(policy.fanout) if policy is not None else getattr(engine, "fanout", None)


def warm_up(engine, prompt: list[int], temperature: float) -> None:
    """One short generation, excluded from measurements (first-call costs, the worker's first round)."""
    EngineRunner(engine).generate([prompt], [SamplingParams(temperature=temperature, max_tokens=4, seed=0)])


def run_prompts(engine, prompts: list[list[int]], opts: AnalysisOptions, temperature: float,
                batch_size: int = 1) -> dict:
    """Generate every prompt (batches of batch_size, seed = opts.seed + prompt index) and summarize
    as `saguaro bench` does: tokens/s, acceptance, mean accepted length, cache hit rate, ..."""
    runner = EngineRunner(engine)

    def params(i: int) -> SamplingParams:
        return SamplingParams(temperature=temperature, max_tokens=opts.max_tokens, seed=opts.seed + i)

    batches = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start: start + batch_size]
        batches.append(run_batch(runner, chunk, [params(start + j) for j in range(len(chunk))]))
    out = summarize(batches)
    if out.get("rounds"):
        out["tokens_per_round"] = (out["tokens"] - out["prompts"]) / out["rounds"]  # the first token is prefill's
    return out


def timed_engine(llm, opts: AnalysisOptions, **kw):
    """An SSD engine for a speed measurement: the worker unless --no-worker.

    A worker engine pins this process to the cores it leaves the target, and the next worker engine
    would then see only those cores and share the target's core. Analyses make one worker engine
    after another, so each starts from the cores this process had when it started.
    """
    if opts.worker and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, available_cores())
    return ssd_engine(llm, opts, worker=opts.worker, **kw)


def write_outputs(name: str, data: dict, fig, opts: AnalysisOptions) -> dict[str, str]:
    """NAME.json (the data, the options, the thread count) and NAME.png under opts.out_dir."""
    from saguaro.bench_plot import save_figure

    opts.out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = opts.out_dir / f"{name}.json", opts.out_dir / f"{name}.png"
    report = {"analysis": name, "options": opts.as_json(), "threads": torch.get_num_threads(), **data}
    json_path.write_text(json.dumps(report, indent=2))
    save_figure(fig, str(png_path))
    log.info("%s: wrote %s and %s", name, json_path, png_path)
    return {"json": str(json_path), "png": str(png_path)}
